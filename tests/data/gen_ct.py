#!/usr/bin/python3
"""Generates a synthetic CT dataset with pydicom: 512x512 16-bit slices, several studies.

    tests/data/gen_ct.py OUTDIR [--instances N] [--studies S] [--series-per-study K] [--size PX]

Deterministic (UIDs derive from the indices), so a cached directory can be reused: the script
does nothing when OUTDIR already holds a complete set made with the same arguments. Each file is
about 512 KiB (Explicit VR Little Endian) at the default --size 512 (--size 64: about 9 KiB, for
tests that count instances rather than bytes). Used by the load/fault integration test and bench/.
"""
import argparse
import datetime
import json
import os
import sys

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, CTImageStorage

ROOT = "1.2.826.0.1.3680043.10.1411"  # a private test root


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--series-per-study", type=int, default=2)
    ap.add_argument("--size", type=int, default=512, help="rows and columns")
    a = ap.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    stamp = os.path.join(a.outdir, "dataset.json")
    want = {"instances": a.instances, "studies": a.studies, "series": a.series_per_study, "v": 1}
    if a.size != 512:
        want["size"] = a.size
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == want:
                return 0

    rng = np.random.default_rng(1411)
    px, half = a.size, a.size // 2
    base = (np.hypot(*np.meshgrid(np.arange(px) - half, np.arange(px) - half)) * 4).astype(np.int16)
    nseries = a.studies * a.series_per_study
    per_series = -(-a.instances // nseries)
    n = 0
    for st in range(a.studies):
        study_uid = f"{ROOT}.1.{st + 1}"
        for se in range(a.series_per_study):
            series_uid = f"{study_uid}.{se + 1}"
            for i in range(per_series):
                if n >= a.instances:
                    break
                n += 1
                sop = f"{series_uid}.{i + 1}"
                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = CTImageStorage
                meta.MediaStorageSOPInstanceUID = sop
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds = Dataset()
                ds.file_meta = meta
                ds.SpecificCharacterSet = "ISO_IR 192"
                ds.SOPClassUID = CTImageStorage
                ds.SOPInstanceUID = sop
                ds.StudyInstanceUID = study_uid
                ds.SeriesInstanceUID = series_uid
                ds.FrameOfReferenceUID = study_uid + ".0"
                ds.PatientName = f"Synthetic^Patient{st % 5 + 1}"
                ds.PatientID = f"SYN{st % 5 + 1:04d}"
                ds.PatientBirthDate = "19700101"
                ds.PatientSex = "O"
                d = datetime.date(2024, 1, 1) + datetime.timedelta(days=st)
                ds.StudyDate = d.strftime("%Y%m%d")
                ds.StudyTime = "101500"
                ds.SeriesDate = ds.StudyDate
                ds.AccessionNumber = f"ACC{st + 1:05d}"
                ds.StudyID = str(st + 1)
                ds.StudyDescription = "Synthetic CT load study"
                ds.SeriesDescription = f"Axial {se + 1}"
                ds.Modality = "CT"
                ds.SeriesNumber = se + 1
                ds.InstanceNumber = i + 1
                ds.ImagePositionPatient = [0, 0, float(i)]
                ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                ds.PixelSpacing = [0.7, 0.7]
                ds.SliceThickness = 1.0
                ds.Rows = ds.Columns = px
                ds.SamplesPerPixel = 1
                ds.PhotometricInterpretation = "MONOCHROME2"
                ds.BitsAllocated = 16
                ds.BitsStored = 12
                ds.HighBit = 11
                ds.PixelRepresentation = 1
                ds.RescaleIntercept = -1024
                ds.RescaleSlope = 1
                ds.WindowCenter = 40
                ds.WindowWidth = 400
                noise = rng.integers(0, 64, size=(px, px), dtype=np.int16)
                ds.PixelData = (base + noise + i).astype(np.int16).tobytes()
                name = os.path.join(a.outdir, f"ct_{n:05d}.dcm")
                ds.is_little_endian = True
                ds.is_implicit_VR = False
                ds.save_as(name, write_like_original=False)
    with open(stamp, "w") as f:
        json.dump(want, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
