"""The speed and memory bars ``tapestry bench`` checks its rows against."""

from __future__ import annotations

from .harness import Row

# (case, dtype, the most its ratio to its baseline may be), and what each bar means:
# CPU, ratios to torch's X.mean(0) on the same data: a trimmed mean within 2x and a median within
#   2.5x of a plain mean; Krum within 1.5x of X @ X.T; bfloat16 input at most 0.6x its float32 time
#   (half the bytes); int8 encode and decode at >= 50% of the machine's copy bandwidth, a ratio
#   <= 1.25 to the copy (5 d bytes moved against the copy's 8 d); the fused int8 trimmed mean
#   within 1.3x of the float32 trimmed mean on already-decoded updates.
# GPU, ratios to a device copy that reads the same bytes (and writes them): reading at >= 80% of
#   the copy's read rate is a ratio <= 1.25, >= 90% is <= 1.11; Krum within 1.3x of X @ X.T.
FLOORS = {"cpu": [("trimmed_mean", "float32", 2.0), ("median", "float32", 2.5), ("krum", "float32", 1.5),
                  ("trimmed_mean", "bfloat16", 0.6), ("quantize_int8", "float32", 1.25),
                  ("dequantize_int8", "float32", 1.25), ("decode_int8_into", "float32", 1.25),
                  ("fused_int8_trimmed_mean", "int8", 1.3)],
          "cuda": [("trimmed_mean", "float32", 1.25), ("median", "float32", 1.25), ("mean", "float32", 1.11),
                   ("krum", "float32", 1.3)]}
# the sweep family: trimmed mean and median at any n within 1.3x a torch mean; 16-bit input at
# most 0.6x its float32 time
SWEEP_FLOOR = {"float32": 1.3, "float16": 0.6, "bfloat16": 0.6}
EXTRA_FLOOR_PCT = {"trimmed_mean": 10.0, "median": 10.0, "krum": 10.0}


def check_floors(rows: list[Row], device: str = "cpu") -> list[str]:
    """One line per floor and per backend: the measured ratio (or extra memory) against its bar."""
    lines = []
    for r in rows:
        for name, dtype, bar in FLOORS["cuda" if device.startswith("cuda") else "cpu"]:
            if r.name == name and r.dtype == dtype and r.ratio is not None:
                verdict = "ok" if r.ratio <= bar else "ABOVE"
                lines.append(f"  {name} {dtype} [{r.backend}]: {r.ratio:.2f}x {r.baseline} (floor {bar}x) {verdict}")
        if r.family == "sweep" and r.ratio is not None:
            bar = SWEEP_FLOOR[r.dtype]
            verdict = "ok" if r.ratio <= bar else "ABOVE"
            lines.append(f"  {r.name} {r.dtype}: {r.ratio:.2f}x {r.baseline} (floor {bar}x) {verdict}")
        if r.name in EXTRA_FLOOR_PCT and r.extra_pct is not None and r.dtype == "float32":
            bar = EXTRA_FLOOR_PCT[r.name]
            verdict = "ok" if r.extra_pct <= bar else "ABOVE"
            lines.append(f"  {r.name} extra memory [{r.backend}]: {r.extra_pct:.2f}% of the input (floor {bar}%) {verdict}")
    return lines
