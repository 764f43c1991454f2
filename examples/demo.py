"""statevault demo: kill a training run again and again; it still ends bit-identical.

Run it with ``make demo`` (or ``.venv/bin/python examples/demo.py``). What it does:

1. starts ``examples/train_lm.py`` (a small character-level transformer language model trained
   with AdamW, a warmup + cosine LR schedule, dropout and a shuffled data order; it checkpoints
   with ``sv.CheckpointManager(..., async_save=True)``) and lets it run to the end undisturbed:
   the reference (in the background, on the second core);
2. runs the same program in a second run directory under a driver that, at seeded random
   moments, SIGKILLs it several times (at random steps, at a random time, and in the middle of
   saves: right after the program says ``saving N``), sends it one SIGTERM (it must save at its
   next step and exit 0 by itself), flips one byte in its newest checkpoint once (the restart must
   skip it and resume from the one before), and restarts it after each interruption; every
   restart resumes through ``restore()``, and after every interruption each committed checkpoint
   is verified;
3. compares the loss curve of every step (as ``float.hex``) and a checksum of the final
   parameters with the reference: they must be bit-identical (the process exits 1 if not);
4. prints ``statevault ls`` of the interrupted run.

Everything is written under ``$STATEVAULT_DEMO_DIR`` or, by default, a new temporary directory.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

import statevault as sv

console = Console(highlight=False)

HERE = Path(__file__).resolve().parent
TRAIN_LM = HERE / "train_lm.py"
SEED = 7
STEPS = 200
SAVE_EVERY = 20
KEEP_EVERY = 100
BALLAST_MIB = 16  # a bigger state makes each save take a while: room for a kill to land in it
ARGS = [
    "--steps",
    str(STEPS),
    "--save-every",
    str(SAVE_EVERY),
    "--keep-every",
    str(KEEP_EVERY),
    "--slow-save",
    str(BALLAST_MIB),
    "--print-progress",
]
SUCCESS = "demo OK: resumed run is bit-identical to the uninterrupted run"
LINE_TIMEOUT = 120.0


# -- one run of the training program ----------------------------------------------------------


class Training:
    """``train_lm.py`` in a subprocess; its progress lines arrive on a queue as they are printed."""

    def __init__(self, run_dir: Path) -> None:
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, str(TRAIN_LM), "--run-dir", str(run_dir), *ARGS],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr.extend(self.proc.stderr)

    def next_line(self) -> str | None:
        """The next progress line; None once the program has closed its output (exited)."""
        line = self._queue.get(timeout=LINE_TIMEOUT)
        if line is not None:
            self.lines.append(line)
        return line

    def wait_for(self, predicate: Callable[[str], bool]) -> str | None:
        """Read lines until one satisfies ``predicate``; None if the program ended first."""
        while (line := self.next_line()) is not None:
            if predicate(line):
                return line
        return None

    def send(self, number: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(number)

    def finish(self) -> int:
        while self.next_line() is not None:
            pass
        return self.proc.wait(timeout=LINE_TIMEOUT)

    def values(self, prefix: str) -> list[int]:
        return [int(x.split()[1]) for x in self.lines if x.startswith(prefix + " ")]

    @property
    def last_step(self) -> int | None:
        found = self.values("step")
        return found[-1] if found else None

    @property
    def resumed_from(self) -> int | None:
        found = self.values("resumed")
        return found[0] if found else None

    @property
    def skipped(self) -> list[str]:
        """The checkpoints that restore() skipped as damaged (it warns, naming each)."""
        found = (re.search(r"skipping damaged checkpoint (\S+): ", x) for x in self.lines)
        return [Path(match.group(1)).name for match in found if match]


def step_of(line: str) -> int:
    words = line.split()
    return int(words[1]) if len(words) >= 2 and words[0] == "step" else -1


def checkpoint_dirs(run: Path) -> list[Path]:
    return sorted(
        p for p in run.glob("step_*") if p.name[5:].isdigit() and (p / "manifest.json").exists()
    )


def verify_all(run: Path) -> tuple[int, list[str]]:
    """Verify every committed checkpoint of ``run``: (how many, the problems found)."""
    problems: list[str] = []
    dirs = checkpoint_dirs(run)
    for path in dirs:
        report = sv.verify(path)
        problems += [f"{path.name}: {p}" for p in report.problems]
    return len(dirs), problems


def flip_one_byte(checkpoint: Path) -> str:
    """Flip one bit in the middle of the checkpoint's largest tensor file, in place."""
    shard = max(checkpoint.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    with shard.open("r+b") as handle:
        handle.seek(shard.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x04]))
    return f"{checkpoint.name}/{shard.name}"


# -- the driver -------------------------------------------------------------------------------


@dataclass
class Event:
    kind: str  # "kill-step" | "kill-mid-save" | "kill-random-time" | "sigterm"
    target: int  # the step around which it strikes
    corrupt_after: bool = False  # flip a byte in the newest checkpoint before the next restart


@dataclass
class RunRecord:
    number: int
    resumed_from: int | None
    skipped: list[str]
    ended_by: str
    landed: str
    reached: int | None  # the last step the run completed
    mid_save: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def plan_events(rng: random.Random) -> list[Event]:
    kinds = ["kill-step", "kill-mid-save", "kill-random-time", "kill-mid-save", "kill-step"]
    rng.shuffle(kinds)
    kinds.insert(rng.randint(1, len(kinds) - 1), "sigterm")
    targets = sorted(rng.sample(range(15, STEPS - 40), len(kinds)))
    events = [Event(kind, target) for kind, target in zip(kinds, targets, strict=True)]
    rng.choice([e for e in events[1:-1] if e.kind != "sigterm"]).corrupt_after = True
    return events


def strike(training: Training, event: Event, rng: random.Random) -> tuple[str, int] | None:
    """Wait for the event's moment, then signal; (what landed, signal) or None if it finished."""
    resumed = training.wait_for(lambda x: x.startswith(("resumed", "fresh")))
    if resumed is None:
        return None
    target = max(event.target, (training.resumed_from or 0) + 1)
    if event.kind == "kill-mid-save":
        line = training.wait_for(lambda x: x.startswith("saving ") and int(x.split()[1]) >= target)
        if line is None:
            return None
        delay = rng.uniform(0.005, 0.05)
        time.sleep(delay)
        training.send(signal.SIGKILL)
        return f"{delay * 1000:.0f} ms after 'saving {line.split()[1]}'", signal.SIGKILL
    if event.kind == "kill-random-time":
        delay = rng.uniform(0.3, 2.5)
        time.sleep(delay)
        training.send(signal.SIGKILL)
        return f"{delay:.2f} s after restore", signal.SIGKILL
    line = training.wait_for(lambda x: step_of(x) >= target)
    if line is None:
        return None
    number = signal.SIGTERM if event.kind == "sigterm" else signal.SIGKILL
    training.send(number)
    return "", number


def describe(training: Training, run: Path, how: str, number: int) -> tuple[str, bool]:
    """Where the signal landed, judged from the program's output and the disk after its death."""
    when = f" ({how})" if how else ""
    begun = training.values("saving")
    committed = {int(p.name[5:]) for p in checkpoint_dirs(run)}
    if number == signal.SIGTERM:
        saved = training.values("preempted")
        return (f"saved step {saved[-1]} durably, exited by itself" if saved else how), False
    if begun and begun[-1] not in committed:
        leftovers = sorted(p.name for p in run.glob(f"step_{begun[-1]:09d}.tmp-*"))
        staged = f"saved {begun[-1]}" in training.lines  # save() returned: written in background
        where = "while writing" if staged else "while staging"
        left = f"; left {leftovers[0][:24]}... for the next start to sweep" if leftovers else ""
        return f"mid-save: {where} step {begun[-1]}{when}{left}", True
    reached = training.values("step")
    if not reached:
        return f"during startup / restore{when}", False
    return f"during training, after step {reached[-1]}{when}", False


def interrupted_run(run: Path, rng: random.Random) -> tuple[list[RunRecord], list[str]]:
    """Drive the crash run to its end; returns one record per process and the problems seen."""
    events = plan_events(rng)
    records: list[RunRecord] = []
    problems: list[str] = []
    expected_resume: int | None = None
    pending = list(events)
    mid_save_retries = 3
    while True:
        number = len(records) + 1
        training = Training(run)
        event = pending.pop(0) if pending else None
        struck = strike(training, event, rng) if event else None
        code = training.finish()
        record = RunRecord(
            number,
            training.resumed_from,
            training.skipped,
            "",
            "",
            training.last_step,
            seconds=time.perf_counter() - training.started,
        )
        records.append(record)
        if record.resumed_from != expected_resume and any(
            x.startswith(("resumed", "fresh")) for x in training.lines
        ):
            problems.append(
                f"run {number} resumed from {record.resumed_from}, expected {expected_resume}"
            )
        if "finished" in training.lines and code == 0:
            struck = None  # it reached the end before (or as) the signal came
        if struck is None:  # ran to the end
            record.ended_by, record.landed = f"finished (exit {code})", "—"
            if code != 0 or "finished" not in training.lines:
                problems.append(f"run {number} exited {code}: {''.join(training.stderr)[-2000:]}")
            report_run(record)
            break
        how, signum = struck
        record.ended_by = "SIGTERM" if signum == signal.SIGTERM else "SIGKILL"
        record.landed, record.mid_save = describe(training, run, how, signum)
        if signum == signal.SIGTERM and (code != 0 or not training.values("preempted")):
            problems.append(f"SIGTERM: run {number} exited {code} without a preemption save")
        if signum == signal.SIGKILL and code != -signal.SIGKILL:
            problems.append(f"run {number} exited {code}: {''.join(training.stderr)[-2000:]}")
        if event and event.kind == "kill-mid-save" and not record.mid_save and mid_save_retries:
            mid_save_retries -= 1  # the save was already durable: try once more later
            pending.insert(0, Event("kill-mid-save", event.target + SAVE_EVERY))
        count, damaged = verify_all(run)
        problems += damaged
        record.notes.append(f"{count} committed checkpoints verify" if not damaged else "DAMAGED")
        steps = [int(p.name[5:]) for p in checkpoint_dirs(run)]
        expected_resume = steps[-1] if steps else None
        if event and event.corrupt_after and len(steps) >= 2:
            flipped = flip_one_byte(run / f"step_{steps[-1]:09d}")
            record.notes.append(f"then flipped one byte in {flipped}")
            expected_resume = steps[-2]
        report_run(record)
    return records, problems


def report_run(record: RunRecord) -> None:
    start = "fresh start" if record.resumed_from is None else f"resumed from {record.resumed_from}"
    if record.skipped:
        start += f" [yellow](skipped damaged {', '.join(record.skipped)})[/]"
    landed = record.landed if record.landed != "—" else ""
    color = "green" if record.ended_by.startswith("finished") else "red"
    console.print(
        f"  run {record.number}: {start}, [{color}]{record.ended_by}[/] {escape(landed)} "
        f"[dim]({record.seconds:.1f} s)[/]"
    )
    for note in record.notes:
        console.print(f"         [dim]{escape(note)}[/]")


# -- output -----------------------------------------------------------------------------------


def summary_table(records: list[RunRecord]) -> Table:
    table = Table(title="the interrupted run, process by process", title_justify="left")
    for name in (
        "run",
        "resumed from",
        "damaged checkpoint skipped",
        "ended by",
        "where it landed",
    ):
        table.add_column(name)
    for r in records:
        table.add_row(
            str(r.number),
            "fresh start" if r.resumed_from is None else f"step {r.resumed_from}",
            ", ".join(r.skipped) or "—",
            r.ended_by,
            escape(r.landed),
        )
    return table


def comparison(reference: dict[str, object], resumed: dict[str, object]) -> tuple[Table, bool]:
    ref_losses, res_losses = reference["losses"], resumed["losses"]
    assert isinstance(ref_losses, list) and isinstance(res_losses, list)
    same_steps = sum(a == b for a, b in zip(ref_losses, res_losses, strict=False))
    losses_ok = ref_losses == res_losses
    params_ok = reference["parameters_sha256"] == resumed["parameters_sha256"]
    table = Table("step", "uninterrupted loss", "interrupted + resumed loss", "identical")
    for step in (0, 1, SAVE_EVERY, STEPS // 2, STEPS - 2, STEPS - 1):
        a = ref_losses[step] if step < len(ref_losses) else "—"
        b = res_losses[step] if step < len(res_losses) else "—"
        table.add_row(
            str(step),
            f"{float.fromhex(a):.6f}  {a}" if a != "—" else a,
            f"{float.fromhex(b):.6f}  {b}" if b != "—" else b,
            "yes" if a == b else "[red]NO[/]",
        )
    mark = {True: "[green]bit-identical[/]", False: "[red]DIFFERENT[/]"}
    console.print(
        f"  loss curve: {same_steps} of {len(ref_losses)} steps identical to the last bit "
        f"-> {mark[losses_ok]}\n"
        f"  parameters: sha256 {str(resumed['parameters_sha256'])[:16]}... vs "
        f"{str(reference['parameters_sha256'])[:16]}... -> {mark[params_ok]}"
    )
    return table, losses_ok and params_ok


def statevault_ls(run: Path) -> None:
    """``statevault ls RUN`` with the console script next to this python (fallback: the API)."""
    script = Path(sys.executable).parent / "statevault"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "statevault.cli"]
    retention = ["--keep-last", "3", "--keep-every", str(KEEP_EVERY), "--best-metric", "loss"]
    env = {**os.environ, "COLUMNS": str(max(console.width, 120))}
    for extra in (retention, []):
        console.print(f"[bold]$ statevault ls {' '.join(extra)} {run}[/]".replace("  ", " "))
        result = subprocess.run(
            [*command, "ls", *extra, str(run)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=env,
        )
        if result.returncode == 0:
            console.out(result.stdout.rstrip(), highlight=False)
            return
        console.print(f"[dim]{escape(result.stderr.strip()[-300:])}[/]")
        if result.returncode != 2:  # not a usage error: no point trying without the options
            break
    console.print("[dim](statevault ls is not available here; listing through the API)[/]")
    with sv.CheckpointManager(
        run, max_to_keep=3, keep_every_n_steps=KEEP_EVERY, best_metric="loss"
    ) as manager:
        table = Table("step", "status", "loss", "kept because")
        for record in manager.checkpoints():
            loss = record.metrics.get("loss")
            table.add_row(
                str(record.step),
                record.status,
                f"{loss:.4f}" if isinstance(loss, float) else "—",
                ", ".join(record.kept_because) or "—",
            )
        console.print(table)


def heading(number: int, title: str) -> None:
    console.print()
    console.rule(f"[bold cyan]{number}. {title}")


def main() -> int:
    began = time.perf_counter()
    given = os.environ.get("STATEVAULT_DEMO_DIR")
    workdir = Path(given) if given else Path(tempfile.mkdtemp(prefix="statevault-demo-"))
    reference_run, crash_run = workdir / "uninterrupted", workdir / "interrupted"
    for path in (reference_run, crash_run):
        shutil.rmtree(path, ignore_errors=True)
    console.print(
        Panel.fit(
            "A small transformer language model trains with AdamW, a warmup + cosine schedule, "
            "dropout and a shuffled data order,\ncheckpointing asynchronously with "
            "[bold]sv.CheckpointManager[/]. We kill it again and again, in the middle of saves "
            "too,\nand check that it ends [bold]bit for bit[/] where an uninterrupted run ends.",
            title="statevault crash-and-resume demo",
        )
    )

    heading(1, f"The uninterrupted reference: {STEPS} steps, in the background")
    reference = Training(reference_run)
    console.print(f"  {escape(' '.join(['train_lm.py', '--run-dir', str(reference_run), *ARGS]))}")

    heading(2, "The same program, killed again and again, restarted each time")
    rng = random.Random(SEED)
    records, problems = interrupted_run(crash_run, rng)

    code = reference.finish()
    if code != 0 or "finished" not in reference.lines:
        console.print(f"[bold red]the reference run failed[/] (exit {code})")
        console.print(escape("".join(reference.stderr)[-3000:]))
        return 1
    console.print(
        f"\n  reference run finished in {time.perf_counter() - reference.started:.1f} s "
        "(it ran beside the interrupted one)"
    )

    heading(3, "Summary")
    console.print(summary_table(records))
    kills = [r for r in records if r.ended_by == "SIGKILL"]
    mid_save = [r for r in kills if r.mid_save]
    sigterms = [r for r in records if r.ended_by == "SIGTERM"]
    skipped = [s for r in records for s in r.skipped]
    console.print(
        f"  {len(records)} processes: {len(kills)} SIGKILLs ({len(mid_save)} in the middle of a "
        f"save), {len(sigterms)} SIGTERM, {len(skipped)} damaged checkpoint(s) skipped on restart"
    )
    if len(kills) < 4 or not mid_save or len(sigterms) != 1:
        problems.append("the driver did not interrupt the run as planned")

    heading(4, "Compare with the uninterrupted run")
    final_ref = json.loads((reference_run / "final.json").read_text())
    final_crash = json.loads((crash_run / "final.json").read_text())
    table, identical = comparison(final_ref, final_crash)
    console.print(table)

    heading(5, "The interrupted run's checkpoints")
    statevault_ls(crash_run)
    shutil.rmtree(reference_run, ignore_errors=True)  # compared already; keep the disk tidy
    console.print(
        f"\n[dim]the interrupted run is kept in {crash_run}; "
        f"demo took {time.perf_counter() - began:.0f} s[/]"
    )

    for problem in problems:
        console.print(f"[bold red]problem:[/] {escape(problem)}")
    if not identical or problems:
        console.print("[bold red]demo FAILED: the resumed run is not bit-identical[/]")
        return 1
    console.print(f"[bold green]{SUCCESS}[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
