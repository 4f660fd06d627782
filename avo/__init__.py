"""AVO: agentic variation operators for evolving GPU attention kernels."""
from avo.types import EvalResult as EvalResult
from avo.types import Problem as Problem
from avo.types import Proposal as Proposal
from avo.types import Shape as Shape
from avo.types import Status as Status

__version__ = "0.1.0"
