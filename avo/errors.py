"""Errors a person can act on: reported as one line, never as a traceback."""
from avo.agent.server import ServerError
from avo.contract import ContractError
from avo.harness import HarnessUnavailable
from avo.lineage import LineageError
from avo.search import SearchError
from avo.seeds import SeedError

USER_ERRORS: tuple[type[BaseException], ...] = (SearchError, SeedError, HarnessUnavailable, ContractError,
                                                ServerError, LineageError)
