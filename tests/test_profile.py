"""The profile tool: finding ncu, its command line, reading its reports, and the hard kill.

Reading a report runs the real ncu where scripts/setup_ncu_cpu.sh provides it (AVO_NCU, AVO_NCU_REPORT;
AVO_REQUIRE_NCU=1 makes its absence a failure). Profiling on the GPU is in tests/gpu/test_profile_gpu.py.
"""
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from avo.agent.knowledge import KnowledgeBase
from avo.agent.memory import Notes
from avo.agent.tools import Workbench
from avo.harness import CompileHarness, HarnessBench
from avo.harness.gpu import GpuHarness
from avo.harness.profile import (
    REPORT,
    ProfileError,
    export_csv,
    find_ncu,
    hot_instructions,
    ncu_command,
    stalls,
    summarise,
)
from avo.harness.sandbox import run_worker
from avo.types import Status
from tests.test_agent_logic import ctx

HEAD = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
        '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value","Rule Name","Rule Type",'
        '"Rule Description","Estimated Speedup Type","Estimated Speedup"')


def row(kid, section, metric="", unit="", value="", rule="", kind="", text="", gain=""):
    return (f'"{kid}","42","python3","h","avo_attention","1","7","(384, 1, 1)","(132, 1, 1)","0","9.0",'
            f'"{section}","{metric}","{unit}","{value}","{rule}","{kind}","{text}","local","{gain}"')


DETAILS = "\n".join([
    "==PROF== Connected to process 42 (/usr/bin/python3.12)",
    "==WARNING== a warning before the table",
    HEAD,
    row(0, "GPU Speed Of Light Throughput", "Duration", "us", "1,234.56"),
    row(0, "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "71.20"),
    row(0, "GPU Speed Of Light Throughput", rule="SOLBottleneck", kind="OPT",
        text="Compute is more heavily utilized than Memory. " + "Look at the compute workload. " * 30, gain="12.5"),
    row(0, "Launch Statistics", "Registers Per Thread", "register/thread", "168"),
    row(0, "Occupancy", "Achieved Occupancy", "%", "18.70"),
    row(0, "Occupancy", rule="AchievedOccupancy", kind="INF", text="Occupancy is limited by registers."),
    row(1, "Launch Statistics", "Registers Per Thread", "register/thread", "99"),  # a second launch: ignored
])
RAW = "\n".join([
    '"ID","Kernel Name","smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",'
    '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",'
    '"smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio",'
    '"smsp__average_warps_issue_stalled_sleeping_per_issue_active.ratio","gpu__time_duration.sum"',
    '"","","ratio","ratio","ratio","ratio","us"',
    '"0","avo_attention","0.50","0.25","1.25","0","1,234.56"',
])
# ncu's source page (--page source --print-source sass) as the H200 wrote it for sm90, a few instructions and columns
SOURCE = "\n".join([
    '"Kernel Name","avo_attention",',
    '"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
    '"Instructions Executed","stall_barrier","stall_long_sb","stall_wait","stall_wait (Not Issued)"',
    '"0x7f61257a0000","      MOV R1, c[0x0][0x28]","0","0","1584","0","0","0","0"',
    '"0x7f61257a0010","      LDC R2, c[0x0][0x30]","20","20","1584","0","0","20","20"',
    '"0x7f61257e44f0","      HGMMA.64x176x16.F32.BF16 R24, gdesc[UR20], RZ, !UPT","310","300","3014656",'
    '"300","0","10","9"',
    '"0x7f61257e77d0","      MUFU.EX2 R55, R86","190","150","3014656","0","0","160","150"',
    '"0x7f61257e77f0","      MUFU.EX2 R49, R49","200","160","3014656","0","0","170","160"',
    '"0x7f61257ebf40","@!P0  BRA 0x7f61257ecc40","280","270","385024","0","270","10","9"',
    '"0x7f61257ebf50","      NOP","0","0","0","0","0","0","0"',
])


def test_summary_reads_the_first_launch_its_stalls_and_ncus_findings():
    text = summarise(DETAILS, RAW, "full_b8_s4096_h16-16_d128")
    assert text.startswith("Nsight Compute profile of avo_attention on full_b8_s4096_h16-16_d128 (grid (132, 1, 1)")
    assert "  Duration: 1,234.56 us" in text and "  Achieved Occupancy: 18.70 %" in text
    assert "Registers Per Thread: 168 register/thread" in text and ": 99 " not in text
    lines = text.splitlines()
    at = lines.index("Warp stalls (cycles per issued instruction, largest first):")
    assert lines[at + 1:at + 4] == ["  math_pipe_throttle: 1.25 (62%)", "  barrier: 0.50 (25%)",
                                    "  long_scoreboard: 0.25 (12%)"]
    assert "sleeping" not in text  # zero stalls say nothing
    opt = next(ln for ln in lines if "[OPT] SOLBottleneck" in ln)
    assert opt.endswith("... (ncu's estimated gain: 12.5%)") and len(opt) < 500
    assert "[INF] AchievedOccupancy: Occupancy is limited by registers." in text


def test_the_source_page_says_which_instructions_the_warps_wait_at_and_why():
    lines = hot_instructions(SOURCE)
    print("\n".join(lines))
    assert lines[0] == "Warp-stall samples by SASS instruction (1000 samples; share of all, main reasons):"
    assert lines[1] == ("  by opcode: MUFU 39.0% (wait 33.0%); HGMMA 31.0% (barrier 30.0%, wait 1.0%); "
                        "BRA 28.0% (long_sb 27.0%, wait 1.0%); LDC 2.0% (wait 2.0%)")
    # offsets from the kernel's first instruction (sampled or not), as cuobjdump prints them; predicates stay
    assert lines[2] == ("   31.0% +0x444f0 HGMMA.64x176x16.F32.BF16 R24, gdesc[UR20], RZ, !UPT  "
                        "(barrier 30.0%, wait 1.0%)")
    assert lines[3] == "   28.0% +0x4bf40 @!P0 BRA 0x7f61257ecc40  (long_sb 27.0%, wait 1.0%)"
    assert lines[6] == "    2.0% +0x00010 LDC R2, c[0x0][0x30]  (wait 2.0%)"
    assert len(lines) == 7 and "NOP" not in "\n".join(lines) and "MOV" not in "\n".join(lines)  # never sampled
    assert "(Not Issued)" not in "\n".join(lines)  # a subset of the samples, not a reason of its own
    text = summarise(DETAILS, RAW, "full_b8_s4096_h16-16_d128", SOURCE)
    assert "\n".join(lines) in text and text.index("Warp-stall samples") < text.index("ncu's findings:")
    assert hot_instructions("") == [] and hot_instructions(SOURCE.split("\n", 2)[0]) == []
    assert "Warp-stall samples" not in summarise(DETAILS, RAW, "k")


def test_a_report_without_metrics_or_columns_is_an_error():
    with pytest.raises(ProfileError, match="no metrics"):
        summarise("==PROF== nothing profiled\n", RAW, "k")
    with pytest.raises(ProfileError, match="no column Metric Name"):
        summarise('"ID","Section Name","Metric Value"\n"0","s","1"\n', RAW, "k")
    assert stalls("") == [] and stalls('"ID","x"\n') == []


def test_find_ncu_takes_a_path_or_a_name_on_path(tmp_path, monkeypatch):
    ncu = tmp_path / "my-ncu"
    ncu.write_text("#!/bin/sh\n")
    ncu.chmod(0o755)
    assert find_ncu(str(ncu)) == str(ncu)
    assert find_ncu(str(tmp_path / "missing")) is None
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert find_ncu("my-ncu") == str(ncu)


def test_ncu_records_the_second_launch_of_the_kernel_at_benchmark_clocks(tmp_path):
    (tmp_path / "profile.ncu-rep").write_text("an earlier run's report")
    cmd = ncu_command("/x/ncu", tmp_path)
    assert not (tmp_path / "profile.ncu-rep").exists()
    joined = " ".join(cmd)
    assert cmd[0] == "/x/ncu" and f"--export {tmp_path}/profile" in joined
    for part in ("--clock-control none", "--kernel-name avo_attention", "--launch-skip 1", "--launch-count 1",
                 "--section SpeedOfLight", "--section WarpStateStats"):
        assert part in joined


def test_profile_arguments_are_checked_before_any_run(tmp_path):
    harness = SimpleNamespace(cfg=SimpleNamespace(profiler=str(tmp_path / "no-such-ncu")))
    c = ctx(tmp_path)
    with pytest.raises(ProfileError, match=r"Nsight Compute \(.*no-such-ncu\) is not installed"):
        GpuHarness.profile(harness, c.best.source, c.problem)
    ncu = tmp_path / "ncu"
    ncu.write_text("#!/bin/sh\nexit 1\n")
    ncu.chmod(0o755)
    harness.cfg.profiler = str(ncu)
    with pytest.raises(ProfileError, match="unknown shape 'nope'; profile one of: full_b1_s16_h2-2_d64"):
        GpuHarness.profile(harness, c.best.source, c.problem, "nope")


def test_profile_tool_reports_why_there_is_no_profile(tmp_path):
    c = ctx(tmp_path)
    c.bench = HarnessBench(CompileHarness(SimpleNamespace(arch="sm_90a", timeout_s=60), tmp_path), c.problem)
    r = Workbench(c, Notes(tmp_path), KnowledgeBase()).call("profile", {})
    assert not r.ok and "not available with harness=compile" in r.text

    class Refuses:  # a harness whose profiler failed: the message reaches the model, nothing raises
        name, ranks, checks, profiles = "gpu", True, True, True

        def profile(self, source, problem, shape=None):
            raise ProfileError(f"unknown shape {shape!r}")

    c.bench = HarnessBench(Refuses(), c.problem)
    r = Workbench(c, Notes(tmp_path), KnowledgeBase()).call("profile", {"shape": "s9"})
    assert not r.ok and r.text == "profile: unknown shape 's9'"


def test_the_hard_timeout_kills_the_profiler_and_its_worker(tmp_path):
    marker = f"avo-profile-test-{os.getpid()}"
    prefix = [sys.executable, "-c", "import subprocess, sys; subprocess.run(['sleep', '120']); sys.exit(0)", marker]
    t0 = time.monotonic()
    r = run_worker(tmp_path, 2, prefix=prefix)
    assert r.status == Status.TIMEOUT and time.monotonic() - t0 < 20
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in ps and "sleep 120" not in ps


def real_ncu() -> tuple[str, str]:
    ncu, report = os.environ.get("AVO_NCU"), os.environ.get("AVO_NCU_REPORT")
    if not (ncu and report):
        if os.environ.get("AVO_REQUIRE_NCU") == "1":
            pytest.fail("AVO_REQUIRE_NCU=1 but AVO_NCU/AVO_NCU_REPORT are unset: eval \"$(scripts/setup_ncu_cpu.sh)\"")
        pytest.skip("no Nsight Compute here: eval \"$(scripts/setup_ncu_cpu.sh)\"")
    return ncu, report


def test_real_ncu_accepts_the_profile_command_line(tmp_path):
    ncu, _ = real_ncu()
    p = subprocess.run([*ncu_command(ncu, tmp_path), sys.executable, "-c", "pass"], capture_output=True, text=True,
                       timeout=120)
    said = p.stdout + p.stderr
    for refusal in ("--help", "did not match any section", "nrecogni", "invalid"):
        assert refusal not in said, said
    assert "No kernels were profiled" in said  # it got as far as running the program


def test_real_ncu_reads_a_report_into_a_summary(tmp_path):
    ncu, report = real_ncu()
    (tmp_path / "worker.log").write_text("==PROF== Connected\n==ERROR== Failed to initialize the profiler\n")
    with pytest.raises(ProfileError, match="recorded no launch of avo_attention: ==ERROR== Failed to init"):
        export_csv(ncu, tmp_path)
    shutil.copy(report, tmp_path / f"{REPORT}.ncu-rep")
    details_csv, raw_csv, source_csv = export_csv(ncu, tmp_path)
    assert (tmp_path / "details.csv").read_text() == details_csv and (tmp_path / "raw.csv").read_text() == raw_csv
    assert (tmp_path / "source.csv").read_text() == source_csv
    text = summarise(details_csv, raw_csv, "example", source_csv)
    print(text)
    assert "Warp-stall samples by SASS instruction (" in text
    lines = text.splitlines()
    for line in ("GPU Speed Of Light Throughput:", "Launch Statistics:", "Occupancy:", "ncu's findings:",
                 "Warp stalls (cycles per issued instruction, largest first):"):
        assert line in lines
    for metric in ("Duration", "Registers Per Thread", "Achieved Occupancy", "Grid Size"):
        assert any(ln.startswith(f"  {metric}: ") for ln in lines), metric
    at = lines.index("Warp stalls (cycles per issued instruction, largest first):")
    values = [float(ln.split(": ")[1].split()[0]) for ln in lines[at + 1:at + 7]]
    assert len(values) == 6 and values == sorted(values, reverse=True) and values[0] > 0
