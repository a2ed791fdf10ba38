"""Synthetic cohort: generation time per study and mid-slice PNGs of a control and a dementia T1.

    python benchmarks/synth.py [--quick] [--studies N] [--out DIR]

Prints its figures last, one ``name: value`` a line. The PNGs (three planes of the 3D T1 with the
ground-truth label map outlined beside it) are written under ``--out`` for a person to look at.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from cohortflow.models.synth import Fault, SynthConfig
from cohortflow.pipelines.atlas.headmodel import load_or_build
from cohortflow.pipelines.synth.cohort import generate


def _mid_planes(arr: np.ndarray) -> Image.Image:
    hi = float(np.percentile(arr, 99.5)) or 1.0
    planes = [arr[arr.shape[0] // 2], arr[:, arr.shape[1] // 2], arr[:, :, arr.shape[2] // 2]]
    tiles = [
        Image.fromarray((np.clip(p / hi, 0, 1) * 255).astype(np.uint8)).resize((256, 256))
        for p in planes
    ]
    out = Image.new("L", (256 * 3, 256))
    for i, t in enumerate(tiles):
        out.paste(t, (256 * i, 0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="4 studies instead of 20")
    ap.add_argument("--studies", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/output/synth"))
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args()
    n = args.studies or (4 if args.quick else 20)
    cache = args.cache or Path(os.environ.get("COHORTFLOW_TEST_CACHE", "cohortflow-data/cache"))
    t0 = time.perf_counter()
    load_or_build(cache)
    t_model = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = generate(
        SynthConfig(studies=n, seed=2026),
        args.out / "cohort",
        cache,
        workers=min(2, os.cpu_count() or 1),
        overwrite=True,
    )
    t_gen = time.perf_counter() - t0

    # Mid-slice PNGs: the first clean T1 of a control and of a dementia patient.
    written = []
    dementia_cfg = SynthConfig(
        studies=4,
        seed=7,
        protocol_weights={"dementia": 1.0},
        fault_rates={f: 0.0 for f in Fault},
        repeat_visit_rate=0.0,
    )
    pair = generate(dementia_cfg, args.out / "pair", cache, workers=2, overwrite=True)
    for group in ("control", "dementia"):
        for p in pair.truth.patients:
            st = p.studies[0]
            t1 = next(se for se in st.series if se.kind == "t1_3d")
            if p.group != group:
                continue
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(pair.out_dir / t1.folder)))
            arr = sitk.GetArrayFromImage(reader.Execute()).astype(np.float32)
            png = args.out / f"t1_{group}_{p.key}.png"
            _mid_planes(arr).save(png)
            assert st.volumes is not None
            written.append((png, st.volumes.bpf, st.volumes.brain_ml, st.volumes.icv_ml))
            break
    for png, bpf, brain, icv in written:
        print(f"png: {png} (icv {icv:.0f} ml, brain {brain:.0f} ml, bpf {bpf:.3f})")
    print(f"head_model_seconds: {t_model:.1f}")
    print(f"studies: {n}")
    print(f"generation_seconds: {t_gen:.1f}")
    print(f"seconds_per_study: {t_gen / n:.2f}")
    files = sum(se.files for p in result.truth.patients for s in p.studies for se in s.series)
    print(f"files_written: {files}")


if __name__ == "__main__":
    main()
