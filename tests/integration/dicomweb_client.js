// A second, independent DICOMweb client: dcmjs's `dicomweb-client` (npm) under node, driven by
// test_dicomweb_client.py. Usage: node dicomweb_client.js BASE_URL STUDY SERIES SOP [FILE...]
// (the FILEs, Part 10 instances, are stored last with STOW-RS, all in one request)
// The access token comes from $KP_TOKEN.
// Prints one JSON object with what each call returned (sizes, counts, UIDs) on stdout.
global.XMLHttpRequest = require('xhr2');
const { api } = require('dicomweb-client');

async function main() {
  const [base, study, series, sop, ...files] = process.argv.slice(2);
  // the bearer token of an account, from the environment (the gateway requires one)
  const headers = process.env.KP_TOKEN ? { Authorization: 'Bearer ' + process.env.KP_TOKEN } : {};
  const client = new api.DICOMwebClient({ url: base + '/dicom-web', headers });
  const out = {};
  const studies = await client.searchForStudies({ queryParams: { PatientName: '*' } });
  out.studies = studies.map((s) => s['0020000D'].Value[0]);
  const series_ = await client.searchForSeries({ studyInstanceUID: study });
  out.series = series_.map((s) => s['0020000E'].Value[0]);
  const instances = await client.searchForInstances({ studyInstanceUID: study, seriesInstanceUID: series });
  out.instances = instances.map((s) => s['00080018'].Value[0]);
  const meta = await client.retrieveSeriesMetadata({ studyInstanceUID: study, seriesInstanceUID: series });
  out.metadata_sops = meta.map((m) => m['00080018'].Value[0]);
  out.metadata_rows = meta[0]['00280010'].Value[0];
  const frames = await client.retrieveInstanceFrames({
    studyInstanceUID: study, seriesInstanceUID: series, sopInstanceUID: sop, frameNumbers: [1],
  });
  out.frame_bytes = frames.map((f) => f.byteLength);
  const inst = await client.retrieveInstance({
    studyInstanceUID: study, seriesInstanceUID: series, sopInstanceUID: sop,
  });
  out.instance_bytes = inst.byteLength;
  out.instance_dicm = Buffer.from(inst).subarray(128, 132).toString('latin1');
  if (files.length) {
    const fs = require('fs');
    const datasets = files.map((f) => {
      const b = fs.readFileSync(f);
      return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
    });
    const res = await client.storeInstances({ datasets });
    out.stored = JSON.parse(typeof res === 'string' ? res : Buffer.from(res).toString('utf8'));
  }
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error('dicomweb-client failed:', e && (e.message || e.status || e));
  process.exit(1);
});
