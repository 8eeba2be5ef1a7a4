"""Timings of weightlens.linalg decompositions, as ratios against baselines taken in the same run.

For each device present (CPU; CUDA when available) and each shape it reports, as a Markdown table:

* ``torch svd``: ``torch.linalg.svd(x, full_matrices=False)`` with the default driver (baseline);
* ``wl.svd / torch``: weightlens' guarded SVD (driver table, checks, sign fixing) over the baseline;
* ``svdvals / svd`` and ``polar / svd``: weightlens' svdvals and polar over weightlens' svd;
* on CUDA, a second table with every cuSOLVER driver against the default: time ratio, maximum
  relative reconstruction error ``||A - U diag(S) Vh||_F / ||A||_F`` and loss of orthonormality
  ``max |U^T U - I|`` (both in float64), and the driver the table in ``weightlens.linalg`` picks.

Run ``python benchmarks/bench_linalg.py`` (``--help`` for options) and record the figures in
``benchmarks/RESULTS.md``; retune ``weightlens.linalg.devices.CUDA_DRIVER_TABLE`` from them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from weightlens import linalg

from _machine import machine  # noqa: E402  (benchmarks run as scripts)

SHAPES: list[tuple[int, ...]] = [(384, 384), (1536, 384), (768, 768), (3072, 768), (4, 384, 384)]
DRIVERS: list[str | None] = [None, "gesvd", "gesvdj", "gesvda"]




def timeit(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median wall time in seconds of each function, after one warm-up call each.

    The functions run round-robin (one call of each per round), so load that drifts during the run
    (a shared machine) biases the ratios less than timing each function in a block.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    sync()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def errors(x: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[float, float]:
    """Max relative reconstruction error and max orthonormality loss of U, in float64."""
    a, U, S, Vh = (t.double() for t in (x, U, S, Vh))
    recon = torch.linalg.matrix_norm(a - U @ (S.unsqueeze(-1) * Vh)) / torch.linalg.matrix_norm(a)
    eye = torch.eye(U.shape[-1], dtype=torch.float64, device=U.device)
    ortho = (U.mT @ U - eye).abs().amax()
    return float(recon.max()), float(ortho)


def label(shape: tuple[int, ...]) -> str:
    """``4x384x384`` for a shape."""
    return "x".join(map(str, shape))


def _shapes(text: str) -> list[tuple[int, ...]]:
    """``"768x768,4x384x384"`` as shapes."""
    try:
        return [tuple(int(d) for d in part.split("x")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes are written like 768x768,4x384x384; got {text!r}") from None


def bench_api(device: torch.device, dtype: torch.dtype, repeats: int,
              shapes: list[tuple[int, ...]] = SHAPES) -> list[str]:
    """Rows of the API table for one device."""
    rows = []
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
        t = timeit(
            {
                "torch": lambda: torch.linalg.svd(x, full_matrices=False),
                "svd": lambda: linalg.svd(x, device=device, dtype=dtype),
                "svdvals": lambda: linalg.svdvals(x, device=device, dtype=dtype),
                "polar": lambda: linalg.polar(x, device=device, dtype=dtype),
            },
            device,
            repeats,
        )
        base, t_svd, t_vals, t_polar = t["torch"], t["svd"], t["svdvals"], t["polar"]
        driver = linalg.choose_driver(tuple(shape[-2:]), device) or "default"
        rows.append(
            f"| {label(shape)} | {driver} | {base * 1e3:.1f} | {t_svd * 1e3:.1f} | "
            f"{t_svd / base:.2f} | {t_vals / t_svd:.2f} | {t_polar / t_svd:.2f} |"
        )
    return rows


def bench_drivers(device: torch.device, dtype: torch.dtype, repeats: int,
                  shapes: list[tuple[int, ...]] = SHAPES) -> list[str]:
    """Rows of the CUDA driver table for one device."""
    rows = []
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
        picked = linalg.choose_driver(tuple(shape[-2:]), device)
        runs = {
            driver or "default": (lambda d=driver: torch.linalg.svd(x, full_matrices=False, driver=d))
            for driver in DRIVERS
        }
        for name in list(runs):  # drop drivers that fail on this shape, with a row saying so
            try:
                runs[name]()
            except RuntimeError as exc:
                rows.append(f"| {label(shape)} | {name} | failed: {str(exc).splitlines()[0]} | | | |")
                del runs[name]
        times = timeit(runs, device, repeats)
        for name, seconds in times.items():
            recon, ortho = errors(x, *runs[name]())
            mark = " (table)" if name == (picked or "default") else ""
            ratio = seconds / times["default"] if "default" in times else float("nan")
            rows.append(
                f"| {label(shape)} | {name}{mark} | {seconds * 1e3:.1f} | {ratio:.2f} | "
                f"{recon:.1e} | {ortho:.1e} |"
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse options, run the benchmarks on each device and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per cell (median)")
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; absent ones skipped")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--shapes", type=_shapes, default=SHAPES,
                        help="comma-separated, e.g. 768x768,2304x768,4x384x384 (default: "
                             + ",".join(label(s) for s in SHAPES) + ")")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    wanted = [d.strip() for d in args.devices.split(",") if d.strip()]
    devices = [linalg.resolve_device(d) for d in wanted if d != "cuda" or torch.cuda.is_available()]
    print(f"weightlens.linalg benchmark: torch {torch.__version__}, {args.dtype}, median of {args.repeats}\n")
    for device in devices:
        print(f"### {machine(device)}\n")
        print("| shape | table driver | torch svd ms | wl.svd ms | wl.svd / torch | svdvals / svd "
              "| polar / svd |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(bench_api(device, dtype, args.repeats, args.shapes)) + "\n")
        if device.type == "cuda":
            print("| shape | driver | ms | / default | max rel. recon. error | max abs(U^T U - I) |")
            print("|---|---|---|---|---|---|")
            print("\n".join(bench_drivers(device, dtype, args.repeats, args.shapes)) + "\n")


if __name__ == "__main__":
    main()
