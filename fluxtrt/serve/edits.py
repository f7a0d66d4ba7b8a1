"""``fluxtrt infer --edits FILE.jsonl``: many edits from one load, the server's pipeline without the HTTP front.

One edit a line: ``{"image": PATH, "prompt": TEXT, "out": PATH}`` and optionally ``seed``, ``steps``, ``guidance``,
``size`` (``WIDTHxHEIGHT`` or ``auto``), and with ``--lora``: ``lora`` (the stem of one of the files: that LoRA alone;
null: none; absent: every ``--lora``, each at its scale) and ``lora_scale``. Relative paths are taken from the file's
folder. A line that fails (bad JSON,
a missing or unreadable image, an unwritable out) is reported in one line and the run goes on; each output is
written atomically."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fluxtrt.config import DEFAULT_GUIDANCE, DEFAULT_SEED, OUTPUT_FORMATS, SamplerConfig
from fluxtrt.errors import FluxtrtError, InputError, first_line
from fluxtrt.serve.options import ServedSource
from fluxtrt.specs.flux import Resolution

KEYS = ("image", "prompt", "out", "seed", "steps", "guidance", "size", "lora", "lora_scale")


@dataclass(frozen=True)
class EditLine:
    """One parsed line: what to edit, how, and where the result goes."""

    number: int
    image: Path
    prompt: str
    out: Path
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    size: Resolution | None = None
    lora: str | None = None
    lora_given: bool = False
    lora_scale: float | None = None

    def loras(self, loras: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
        """The LoRA selection of this line (``fluxtrt.serve.loras.Selection``) among ``loras`` (name -> LoRA read).

        Raises:
            InputError: a name that is not one of ``loras``.
        """
        if not self.lora_given:
            return tuple((name, lora.spec.scale) for name, lora in loras.items())
        if self.lora is None:
            return ()
        if self.lora not in loras:
            known = ", ".join(loras) or "none: give --lora FILE"
            raise InputError(f"lora is '{self.lora}', not the stem of a --lora file ({known})")
        scale = self.lora_scale if self.lora_scale is not None else loras[self.lora].spec.scale
        return ((self.lora, scale),)


@dataclass
class LineOutcome:
    """What became of one line: ``ok``, the seconds its edit took, and a one-line detail (the size, or the error)."""

    number: int
    out: str
    ok: bool
    seconds: float
    detail: str
    notices: list[str] = field(default_factory=list)


@dataclass
class EditsReport:
    outcomes: list[LineOutcome] = field(default_factory=list)
    label: str = ""
    load_s: float = 0.0

    @property
    def failed(self) -> list[LineOutcome]:
        return [o for o in self.outcomes if not o.ok]


def parse_line(number: int, text: str, base: Path) -> EditLine:
    """An ``EditLine`` from one JSON line; relative paths are taken from ``base``.

    Raises:
        InputError: not a JSON object, an unknown or missing key, or a value of the wrong kind.
    """
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"not JSON ({exc.msg} at column {exc.colno}): write one object a line") from None
    if not isinstance(entry, dict):
        raise InputError(f"is {type(entry).__name__}, expected an object such as "
                         '{"image": "in.png", "prompt": "...", "out": "out.png"}')  # fmt: skip
    unknown = sorted(set(entry) - set(KEYS))
    missing = [k for k in ("image", "prompt", "out") if not isinstance(entry.get(k), str) or not entry[k].strip()]
    if unknown or missing:
        what = f"unknown keys {', '.join(unknown)}" if unknown else f"no {', '.join(missing)}"
        raise InputError(f"has {what}: expected image, prompt and out (text), optionally {', '.join(KEYS[3:])}")
    out = _path(entry["out"], base)
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise InputError(f"out '{out}' has no image extension: use one of {', '.join(OUTPUT_FORMATS)}")
    for key, kind in (("seed", int), ("steps", int), ("guidance", (int, float)), ("size", str)):
        if key in entry and (not isinstance(entry[key], kind) or isinstance(entry[key], bool)):
            raise InputError(f"{key} is {entry[key]!r}, expected {getattr(kind, '__name__', 'a number')}")
    if entry.get("steps") is not None and entry["steps"] < 1:
        raise InputError(f"steps is {entry['steps']}, expected an integer >= 1")
    size = entry.get("size")
    resolution = None if size is None or size.lower() == "auto" else Resolution.parse(size, "size")
    guidance = float(entry["guidance"]) if "guidance" in entry else None
    lora, scale = _lora_keys(entry)
    return EditLine(number, _path(entry["image"], base), entry["prompt"], out, entry.get("seed"), entry.get("steps"),
                    guidance, resolution, lora, "lora" in entry, scale)  # fmt: skip


def _lora_keys(entry: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """The line's ``lora`` (a name or null) and ``lora_scale`` (a number, with a name only)."""
    from fluxtrt.serve.loras import parse_scale

    lora = entry.get("lora")
    if lora is not None and (not isinstance(lora, str) or not lora.strip()):
        raise InputError(f"lora is {lora!r}, expected the stem of a --lora file, or null for none")
    if "lora_scale" not in entry:
        return lora, None
    if lora is None:
        raise InputError(f'lora_scale is {entry["lora_scale"]!r} but no lora is named: add "lora": NAME')
    return lora, parse_scale(entry["lora_scale"])


def _path(text: str, base: Path) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def read_edits(path: Path) -> list[EditLine | LineOutcome]:
    """The file's lines, parsed; a line that does not parse is a failed ``LineOutcome`` (blank lines are skipped).

    Raises:
        InputError: the file cannot be read, or has no edit.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--edits '{path}' cannot be read ({exc}): pass a UTF-8 JSON-lines file") from None
    entries: list[EditLine | LineOutcome] = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            entries.append(parse_line(number, text, Path(path).parent))
        except FluxtrtError as exc:
            entries.append(LineOutcome(number, "", False, 0.0, f"line {number} {first_line(exc)}"))
    if not entries:
        raise InputError(f"--edits '{path}' has no edit: write one JSON object a line")
    return entries


def run_edits(
    source: ServedSource,
    sampler: SamplerConfig,
    path: Path,
    seed: int = DEFAULT_SEED,
    guidance: float = DEFAULT_GUIDANCE,
    on_edit: Callable[[int, int, str], None] | None = None,
    loader: Callable[[], Any] | None = None,
    loras: Sequence[str] = (),
) -> EditsReport:
    """Load once, then run every line of ``path``; a failing line is recorded and the run goes on.

    Args:
        source: the model or engines.
        sampler: solver and schedule (and the default steps).
        path: the JSON-lines file.
        seed, guidance: of the lines that give none.
        on_edit: progress callback ``(done, total, label)``.
        loader: returns a ``fluxtrt.serve.load.Loaded`` (None: load ``source``).
        loras: ``FILE[:SCALE]`` LoRAs, named by their files' stems, merged for every line that names none.

    Raises:
        FluxtrtError: the file or a LoRA cannot be read, the model cannot be loaded, or a LoRA does not fit it.
    """
    from fluxtrt.lora.files import lora_label
    from fluxtrt.pipeline.image import load_image
    from fluxtrt.pipeline.kontext import DEFAULT_MAX_AREA
    from fluxtrt.serve.load import load
    from fluxtrt.serve.loras import LoraSwitch, read_served

    entries = read_edits(path)
    served = read_served(loras) if loras else {}
    loaded = loader() if loader is not None else load(source, 1)
    switch = LoraSwitch(loaded.pipeline, served) if served else None
    report = EditsReport(label=loaded.label + lora_label(list(served.values())), load_s=loaded.load_s)
    report.outcomes = [e for e in entries if isinstance(e, LineOutcome)]
    edits = [e for e in entries if isinstance(e, EditLine)]
    for done, line in enumerate(edits):
        if on_edit is not None:
            on_edit(done, len(edits), f"line {line.number}")
        t0 = time.perf_counter()
        try:
            selection = line.loras(served)
            if switch is not None:
                switch.use(selection)
            image, image_notices = load_image(line.image)
            size = line.size
            result = loaded.pipeline.edit(image, line.prompt, sampler=replace(sampler, steps=line.steps or
                                          sampler.steps), seed=seed if line.seed is None else line.seed,
                                          guidance=guidance if line.guidance is None else line.guidance,
                                          height=size.height if size else None, width=size.width if size else None,
                                          max_area=DEFAULT_MAX_AREA)  # fmt: skip
            write_image(result.images[0], line.out)
        except FluxtrtError as exc:
            report.outcomes.append(LineOutcome(line.number, str(line.out), False, time.perf_counter() - t0,
                                               f"line {line.number}: {first_line(exc)}"))  # fmt: skip
            continue
        report.outcomes.append(LineOutcome(line.number, str(line.out), True, time.perf_counter() - t0,
                                           str(result.target), [*image_notices, *result.warnings]))  # fmt: skip
    if on_edit is not None:
        on_edit(len(edits), len(edits), "done")
    report.outcomes.sort(key=lambda o: o.number)
    return report


def write_image(image: Any, out: Path) -> None:
    """Write ``image`` to ``out`` atomically, in the format its extension names.

    Raises:
        FluxtrtError: it cannot be written.
    """
    from fluxtrt.pipeline.image import save_image

    save_image(image, out, OUTPUT_FORMATS[out.suffix.lower()], option="out")


def print_edits_report(report: EditsReport) -> None:
    """The summary table on stdout, one row a line of the file; the failures, one line each, on stderr."""
    from rich.markup import escape
    from rich.table import Table

    from fluxtrt.console import err, out

    table = Table(title=escape(f"{report.label}: {len(report.outcomes) - len(report.failed)} of "
                               f"{len(report.outcomes)} edits written (model load {report.load_s:.1f} s)"))  # fmt: skip
    for name, justify in (("line", "right"), ("out", "left"), ("status", "left"), ("s", "right"), ("size", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for o in report.outcomes:
        status = "ok" if o.ok else "[red]failed[/]"
        table.add_row(str(o.number), escape(o.out), status, f"{o.seconds:.2f}", escape(o.detail) if o.ok else "")
    out().print(table)
    console = err()
    for o in report.outcomes:
        for notice in o.notices:
            console.print(f"[yellow]notice:[/] line {o.number}: {escape(notice)}", soft_wrap=True)
    for o in report.failed:
        console.print(f"[red]failed:[/] {escape(o.detail)}", soft_wrap=True)


def edits_progress(total_label: str = "edits"):
    """A rich progress bar over edits on stderr; returns (progress, on_edit)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fluxtrt.console import err

    progress = Progress(TextColumn(total_label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                        TimeElapsedColumn(), console=err())  # fmt: skip
    task = None

    def on_edit(done: int, total: int, label: str) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(label, total=total)
        progress.update(task, completed=done, description=label)

    return progress, on_edit


def run_edits_command(edits: Path, single: dict[str, Any], source: ServedSource, sampler: SamplerConfig, seed: int,
                      guidance: float, loras: Sequence[str] = ()) -> None:  # fmt: skip
    """``fluxtrt infer --edits``: run the file with a progress bar, print the summary.

    Args:
        single: the one-edit options given with it (``--image``...: name -> value), which must all be None.

    Raises:
        InputError: a one-edit option given too.
        FluxtrtError: loading failed, or any line failed (after the summary).
    """
    if loras:
        from fluxtrt.serve.options import check_loras_source

        check_loras_source(source)
    given = [name for name, value in single.items() if value not in (None, 1)]
    if given:
        raise InputError(f"--edits '{edits}' with {', '.join(given)}: each line of the file gives its own image, "
                         "prompt, out and size; leave those options out")  # fmt: skip
    progress, on_edit = edits_progress()
    try:
        report = run_edits(source, sampler, edits, seed, guidance, on_edit, loras=loras)
    finally:
        progress.stop()
    print_edits_report(report)
    if report.failed:
        lines = ", ".join(str(o.number) for o in report.failed)
        raise FluxtrtError(f"{len(report.failed)} of {len(report.outcomes)} edits failed (lines {lines}): see the "
                           f"lines above, fix them and run those again")  # fmt: skip
