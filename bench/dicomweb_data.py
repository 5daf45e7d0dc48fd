#!/usr/bin/python3
"""The DICOMweb benchmark's data set (bench/dicomweb), written with pydicom like tests/data/gen_ct.py.

    bench/dicomweb_data.py OUTDIR [--series N] [--big-series] [--multiframe]

- N series of 50 synthetic CT/MR/PT slices (512x512, 16-bit, Explicit VR Little Endian, the
  pixel pattern of tests/data/gen_ct.py), 3 series per study, studies spread over patient names
  (three starting with SMI), dates (2023-2025) and modalities (CT, CT+MR, CT+PT);
- optionally one 500-instance series (64x64 CT slices: it is there for the metadata figure,
  its pixels do not matter);
- optionally one 200-frame instance (Multi-frame Grayscale Word Secondary Capture, 256x256,
  16-bit, uncompressed, ~26 MB).

Deterministic (UIDs derive from the indices), so a cached directory is reused: nothing is written
when OUTDIR already holds a complete set made with the same arguments. OUTDIR/manifest.json lists
every file with its study, series and SOP Instance UIDs, which is what bench/dicomweb builds its
URLs from.
"""
import argparse
import datetime
import json
import os
import sys

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

ROOT = "1.2.826.0.1.3680043.10.1411.77"  # the private test root of tests/data, branch 77
SOP = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
       "PT": "1.2.840.10008.5.1.4.1.1.128",
       "MFSC": "1.2.840.10008.5.1.4.1.1.7.3"}  # Multi-frame Grayscale Word SC
NAMES = ["SMITH^JOHN", "SMITHERS^ANNA", "SMIRNOV^IVAN", "JONES^MARY", "MÜLLER^HANS",
         "NOWAK^PIOTR", "GARCIA^LUCIA", "TANAKA^YUKI", "OKAFOR^CHIDI", "DUBOIS^CLAIRE"]
VERSION = 1


def s_dataset(sop_class, study_uid, series_uid, sop_uid, patient, date, modality, series_no,
              inst_no, rows, cols):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = study_uid + ".0"
    ds.PatientName = NAMES[patient]
    ds.PatientID = f"DW{patient + 1:04d}"
    ds.PatientBirthDate = f"19{50 + patient * 4}0315"
    ds.PatientSex = "FM"[patient % 2]
    ds.StudyDate = date
    ds.StudyTime = "093000"
    ds.SeriesDate = date
    ds.AccessionNumber = f"DWACC{study_uid.rsplit('.', 1)[1]}"
    ds.StudyID = study_uid.rsplit(".", 1)[1]
    ds.StudyDescription = "DICOMweb benchmark study"
    ds.SeriesDescription = f"{modality} series {series_no}"
    ds.Modality = modality
    ds.SeriesNumber = series_no
    ds.InstanceNumber = inst_no
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 1
    return ds


def s_save(ds, path):
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    ds.save_as(path, write_like_original=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--series", type=int, default=60, help="50-instance series (60)")
    ap.add_argument("--big-series", action="store_true", help="add one 500-instance series")
    ap.add_argument("--multiframe", action="store_true", help="add one 200-frame instance")
    a = ap.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    stamp = os.path.join(a.outdir, "manifest.json")
    want = {"series": a.series, "big": a.big_series, "mf": a.multiframe, "v": VERSION}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f).get("args") == want:
                return 0

    rng = np.random.default_rng(1411)
    base = (np.hypot(*np.meshgrid(np.arange(512) - 256, np.arange(512) - 256)) * 4).astype(np.int16)
    files = []
    n = 0
    nstudies = -(-a.series // 3)
    for st in range(nstudies):
        study_uid = f"{ROOT}.1.{st + 1}"
        patient = st % len(NAMES)
        date = (datetime.date(2023, 1, 9) + datetime.timedelta(days=st * 37)).strftime("%Y%m%d")
        mods = ["CT", "CT", ["CT", "MR", "PT"][st % 3]]
        for se in range(3):
            if st * 3 + se >= a.series:
                break
            series_uid = f"{study_uid}.{se + 1}"
            mod = mods[se]
            for i in range(50):
                n += 1
                sop = f"{series_uid}.{i + 1}"
                ds = s_dataset(SOP[mod], study_uid, series_uid, sop, patient, date, mod, se + 1,
                               i + 1, 512, 512)
                ds.ImagePositionPatient = [0, 0, float(i)]
                ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                ds.PixelSpacing = [0.7, 0.7]
                ds.SliceThickness = 1.0
                ds.RescaleIntercept = -1024
                ds.RescaleSlope = 1
                ds.WindowCenter = 40
                ds.WindowWidth = 400
                noise = rng.integers(0, 64, size=(512, 512), dtype=np.int16)
                ds.PixelData = (base + noise + i).astype(np.int16).tobytes()
                name = f"dw_{n:05d}.dcm"
                s_save(ds, os.path.join(a.outdir, name))
                files.append({"file": name, "study": study_uid, "series": series_uid,
                              "sop": sop, "kind": "slice", "frames": 1})
    if a.big_series:
        study_uid = f"{ROOT}.2.1"
        series_uid = f"{study_uid}.1"
        small = (np.hypot(*np.meshgrid(np.arange(64) - 32, np.arange(64) - 32)) * 30)
        for i in range(500):
            sop = f"{series_uid}.{i + 1}"
            ds = s_dataset(SOP["CT"], study_uid, series_uid, sop, 3, "20250620", "CT", 1, i + 1,
                           64, 64)
            ds.ImagePositionPatient = [0, 0, float(i) * 0.5]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [5.6, 5.6]
            ds.SliceThickness = 0.5
            ds.PixelData = (small + i).astype(np.int16).tobytes()
            name = f"big_{i + 1:05d}.dcm"
            s_save(ds, os.path.join(a.outdir, name))
            files.append({"file": name, "study": study_uid, "series": series_uid, "sop": sop,
                          "kind": "big", "frames": 1})
    if a.multiframe:
        study_uid = f"{ROOT}.3.1"
        series_uid = f"{study_uid}.1"
        sop = f"{series_uid}.1"
        ds = s_dataset(SOP["MFSC"], study_uid, series_uid, sop, 7, "20250701", "OT", 1, 1,
                       256, 256)
        ds.ConversionType = "WSD"
        ds.NumberOfFrames = 200
        ds.FrameIncrementPointer = 0x00181063  # FrameTime
        ds.FrameTime = 40.0
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ramp = np.add.outer(np.arange(256), np.arange(256)).astype(np.int16)
        frames = np.stack([(ramp + k * 7) % 4096 for k in range(200)]).astype(np.int16)
        ds.PixelData = frames.tobytes()
        name = "multiframe_200.dcm"
        s_save(ds, os.path.join(a.outdir, name))
        files.append({"file": name, "study": study_uid, "series": series_uid, "sop": sop,
                      "kind": "multiframe", "frames": 200})
    with open(stamp + ".tmp", "w") as f:
        json.dump({"args": want, "files": files}, f)
    os.replace(stamp + ".tmp", stamp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
