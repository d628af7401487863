"""A report as a step that can fail part by part: every table and figure is one guarded part.

A part that raises is recorded as one line (``fig_error_vs_norm_tiny-opt: ValueError: …``) and the
other parts are still written; :attr:`Report.complete` says whether all of them were. The pipeline
writes :data:`MANIFEST` beside the files (complete or not, the failed parts, the runs it was built
from), so that a rerun with nothing to evaluate knows whether the report still has to be made.
Framework-free (no Prefect, no MLflow).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from quantlens.analysis.rendering import safe_name, to_markdown  # noqa: F401 (safe_name re-exported)

MANIFEST = "report.json"


@dataclass
class Report:
    out: Path
    files: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "<part>: <Error>: <message>", one line each
    fault: Callable[[str], None] = lambda part: None  # drills: raises for the parts it chooses
    progress: Callable[[str], None] = lambda line: None  # "report: <part> (<n> done)" before each part
    done: int = 0

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

    @property
    def complete(self) -> bool:
        return not self.failed

    def _guard(self, part: str, make: Callable[[], Any]) -> tuple[bool, Any]:
        self.progress(f"report: {part} ({self.done} part(s) done, {len(self.failed)} failed)")
        self.done += 1
        try:
            self.fault(part)
            return True, make()
        except Exception as err:  # one part's failure must not cost the others
            msg = " ".join(str(err).split())[:300]
            self.failed.append(f"{part}: {type(err).__name__}: {msg}")
            return False, None

    def table(self, stem: str, make: Callable[[], pd.DataFrame], md: bool = True) -> pd.DataFrame:
        """``make()`` → ``<stem>.csv`` (and ``.md``); returns the frame (empty when it failed or is empty)."""

        def write() -> pd.DataFrame:
            frame = make()
            if frame is None:
                return pd.DataFrame()
            if frame.empty:
                return frame  # nothing to write; its columns still serve the parts that read it
            frame.to_csv(self.out / f"{stem}.csv", index=False)
            written = [self.out / f"{stem}.csv"]
            if md:
                (self.out / f"{stem}.md").write_text(to_markdown(frame))
                written.append(self.out / f"{stem}.md")
            self.files.extend(written)
            return frame

        ok, frame = self._guard(stem, write)
        return frame if ok else pd.DataFrame()

    def figure(self, name: str, make: Callable[[Path], Path | None]) -> None:
        """``make(path)`` draws ``<name>.png`` (or returns None: nothing to draw)."""
        ok, path = self._guard(name, lambda: make(self.out / f"{name}.png"))
        if ok and path is not None:
            self.files.append(Path(path))

    def file(self, name: str, make: Callable[[Path], None]) -> None:
        """Any other file: ``make(path)`` writes ``name``."""
        ok, _ = self._guard(name, lambda: make(self.out / name))
        if ok:
            self.files.append(self.out / name)

    def compute(self, part: str, make: Callable[[], Any], default: Any = None) -> Any:
        """A step several parts need (reading inputs, a shared table): ``default`` when it fails."""
        ok, value = self._guard(part, make)
        return value if ok else default

    def write_manifest(self, runs: list[str]) -> Path:
        path = self.out / MANIFEST
        path.write_text(json.dumps({"complete": self.complete, "failed": self.failed, "runs": sorted(runs),
                                    "files": [p.name for p in self.files]}, indent=1))
        return path


def report_is_complete(out_dir: str | Path, runs: list[str]) -> bool:
    """Whether ``out_dir`` holds a complete report built from (at least) these runs, all its files present."""
    path = Path(out_dir) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return bool(m.get("complete")) and set(runs) <= set(m.get("runs", [])) and all((Path(out_dir) / f).is_file() for f in m.get("files", []))
