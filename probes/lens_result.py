"""The logit / tuned lens's result: readings per position, their summary, tables and files.

Split from :mod:`uniprobe.probes.lens` (which re-exports :class:`LensResult`); the lens itself decodes.
"""

from __future__ import annotations

import csv
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from uniprobe.hooks.jsonio import pack_rows, read_json, unpack_rows, write_json
from uniprobe.hooks.layout import ROLES
from uniprobe.hooks.results_io import SavedFiles, result_dir, result_file


@dataclass
class LensResult:
    """Per-position lens readings.

    Attributes:
        rows: one dict per (lens, point, example, position, answer token): ``lens``, ``point``,
            ``layer``, ``example``, ``pos``, ``role``, ``step``, ``token``, ``rank`` (1 = top),
            ``prob``, ``top_token`` (the lens's own top-1 token there).
        kl: one dict per (lens, point): ``lens``, ``point``, ``layer``, ``kl`` (mean over positions of
            KL(final ‖ lens) in nats, the final distribution being the last block's readout), ``n``.
        meta: model / adapter / answers / roles description.
    """

    rows: list[dict]
    kl: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def summary(self) -> list[dict]:
        """Mean / median rank, mean probability and top-1 rate per lens × layer × role × token."""
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in self.rows:
            groups[(r["lens"], r["point"], r["layer"], r["role"], r["token"])].append(r)
        out = []
        for (lens, point, layer, role, token), rr in sorted(groups.items(), key=lambda kv: _sort_key(kv[0])):
            ranks = [r["rank"] for r in rr]
            out.append(
                {
                    "lens": lens,
                    "point": point,
                    "layer": layer,
                    "role": role,
                    "token": token,
                    "token_str": rr[0].get("token_str"),
                    "n": len(rr),
                    "mean_prob": sum(r["prob"] for r in rr) / len(rr),
                    "mean_rank": sum(ranks) / len(ranks),
                    "median_rank": statistics.median(ranks),
                    "top1": sum(1 for k in ranks if k == 1) / len(ranks),
                }
            )
        return out

    def to_pandas(self, table: str = "rows") -> Any:
        """A pandas DataFrame (pandas is optional: ``pip install pandas``): ``table="rows"`` one row per
        (lens, point, example, position, answer token) as :attr:`rows`; ``"summary"`` one per lens ×
        layer × role × token (:meth:`summary`); ``"kl"`` one per lens × point (:attr:`kl`)."""
        from uniprobe.hooks.tables import import_pandas

        pd = import_pandas("LensResult.to_pandas()")
        tables = {"rows": lambda: self.rows, "summary": self.summary, "kl": lambda: self.kl}
        if table not in tables:
            raise ValueError(f"table must be one of {sorted(tables)}, got {table!r}")
        return pd.DataFrame(tables[table]())

    def to_dict(self) -> dict:
        """``{"meta", "summary", "kl", "rows"}``: what ``lens.json`` (+ ``lens_rows.json``) hold."""
        return {"meta": self.meta, "summary": self.summary(), "kl": self.kl, "rows": self.rows}

    def save(self, out: str | os.PathLike, plot: bool = True) -> SavedFiles:
        """Write lens.json (meta, summary, kl), lens_rows.json (every row, for :meth:`load`),
        lens_rows.csv (the same rows for spreadsheets) and lens_map.png (+ lens_kl.png) to ``out``."""
        out = result_dir(out)
        summary = self.summary()
        files = {
            "json": out / "lens.json",
            "rows": out / "lens_rows.csv",
            "rows_json": out / "lens_rows.json",
        }
        # lenient as before: meta may hold objects a caller put there; they are written as text
        write_json(files["json"], {"meta": self.meta, "summary": summary, "kl": self.kl}, fallback=str)
        # one line, column-major header: the rows are many (layers x positions x answers)
        write_json(files["rows_json"], pack_rows(self.rows), indent=None)
        cols = ["lens", "point", "layer", "example", "pos", "role", "step", "token", "token_str", "rank"]
        cols += ["prob", "top_token"]
        with open(files["rows"], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(self.rows)
        if plot and summary:
            from uniprobe.probes.plots import plot_lens_kl, plot_lens_map

            files["map"] = plot_lens_map(summary, out / "lens_map.png", title=self.meta.get("title"))
            if self.kl:
                files["kl"] = plot_lens_kl(self.kl, out / "lens_kl.png")
        return SavedFiles(out, files)

    @classmethod
    def load(cls, out: str | os.PathLike) -> LensResult:
        """Read what :meth:`save` wrote (rows from ``lens_rows.json``; the summary is recomputed)."""
        doc = read_json(result_file(out, "lens.json"))
        rows = unpack_rows(read_json(result_file(out, "lens_rows.json")))
        return cls(rows, doc.get("kl", []), doc.get("meta", {}))


def _sort_key(key: tuple) -> tuple:
    lens, point, layer, role, token = key
    return (lens != "logit", lens, layer, point, ROLES.index(role) if role in ROLES else 99, token)
