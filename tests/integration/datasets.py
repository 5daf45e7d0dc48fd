"""Test data shared by the integration tests: pydicom's real files and small synthetic studies.

pydicom_files(): every file of pydicom's test_files/ and charset_files/ (real-world DICOM:
compressed syntaxes, character sets, odd encodings).
write_studies(): small studies with chosen names, dates, modalities and numbering, written with
pydicom, for tests that must know exactly what matches a query.
"""
import concurrent.futures
import glob
import os
import tempfile

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

import kp

SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4",
             "US": "1.2.840.10008.5.1.4.1.1.6.1"}


def pydicom_files():
    files = []
    for sub in ("test_files", "charset_files"):
        for f in sorted(glob.glob(os.path.join(kp.PYDICOM_DATA, sub, "*"))):
            if os.path.isfile(f) and not f.endswith((".py", ".pyc", ".txt", ".json", ".gz",
                                                      ".bz2", ".zip", ".xz")):
                files.append(f)
    return files


class Studies:
    """UIDs of studies "S<n>" under a root: study ROOT.n, series ROOT.n.i+1, SOP ROOT.n.i+1.k."""

    def __init__(self, root, studies):
        self.root, self.studies = root, studies

    def study_uid(self, k):
        return f"{self.root}.{k[1:]}"

    def series_uid(self, k, i):
        return f"{self.root}.{k[1:]}.{i + 1}"

    def sop_uid(self, k, i, n):
        return f"{self.root}.{k[1:]}.{i + 1}.{n}"

    def write(self, outdir):
        """Writes every instance; returns the file paths. A study is a dict with name, pid,
        birth, sex, date, time, acc, desc, ref and series: tuples (modality, number,
        description, instance numbers) or (modality, number, description, series date,
        series time, instance numbers)."""
        files = []
        for k, st in self.studies.items():
            for i, series in enumerate(st["series"]):
                mod, num, desc = series[:3]
                sdate, stime = (series[3], series[4]) if len(series) == 6 else (None, None)
                for n in series[-1]:
                    ds = Dataset()
                    ds.SpecificCharacterSet = "ISO_IR 192"
                    ds.SOPClassUID = SOP_CLASS[mod]
                    ds.SOPInstanceUID = self.sop_uid(k, i, n)
                    ds.StudyInstanceUID = self.study_uid(k)
                    ds.SeriesInstanceUID = self.series_uid(k, i)
                    ds.PatientName = st["name"]
                    ds.PatientID = st["pid"]
                    ds.PatientBirthDate = st["birth"]
                    ds.PatientSex = st["sex"]
                    ds.StudyDate = st["date"]
                    ds.StudyTime = st["time"]
                    ds.AccessionNumber = st["acc"]
                    ds.StudyDescription = st["desc"]
                    ds.ReferringPhysicianName = st["ref"]
                    ds.StudyID = k
                    ds.Modality = mod
                    ds.SeriesNumber = num
                    ds.SeriesDescription = desc
                    if sdate is not None:
                        ds.SeriesDate = sdate
                        ds.SeriesTime = stime
                    ds.InstanceNumber = n
                    ds.Rows = ds.Columns = 8
                    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
                    ds.PixelRepresentation = 0
                    ds.SamplesPerPixel = 1
                    ds.PhotometricInterpretation = "MONOCHROME2"
                    ds.PixelData = bytes(128)
                    ds.file_meta = FileMetaDataset()
                    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                    path = os.path.join(outdir, f"{k}-{i}-{n}.dcm")
                    ds.is_little_endian = True
                    ds.is_implicit_VR = False
                    ds.save_as(path, write_like_original=False)
                    files.append(path)
        return files


def load(system, studies):
    """Fills a running system with the synthetic studies (one association) and every pydicom
    file storescu can send (4 in parallel, each in its own syntax); waits until all is indexed."""
    with tempfile.TemporaryDirectory() as d:
        gen = studies.write(d)
        rc, res, out = system.storescu(gen)
        assert all(res.get(f) == "ok" for f in gen), out[-3000:]

        def send(f):
            return system.storescu([f], extra=kp.storescu_flags(f))[1].get(f) == "ok"

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            ok = sum(ex.map(send, pydicom_files()))
        assert ok >= 60
        system.wait_jobs_settled()  # the outbox row is committed before each success
        system.wait_indexed(len(gen))
