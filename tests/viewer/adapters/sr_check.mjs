// Read a study's SR and SEG back from a DICOMweb server the way OHIF 3.13 does, with the
// REAL published code, in Node, and print what it made of them as ONE JSON object.
//
//   node sr_check.mjs --dicomweb http://127.0.0.1:8042/dicom-web --study <StudyInstanceUID>
//
// What runs (versions pinned in package-lock.json):
//  * metadata: QIDO-RS series list, then WADO-RS /studies/{st}/series/{se}/metadata for the CT
//    and the SR (DICOM JSON -> dcmjs DicomMetaDictionary.naturalizeDataset, as OHIF's DICOMweb
//    data source does); CT image ids are OHIF's wadors: ids;
//  * @cornerstonejs/adapters 5.6.8: MeasurementReport.generateToolState on the SR;
//  * @ohif/extension-cornerstone-dicom-sr 3.13.13 (its UMD dist; the OHIF app, React and
//    cornerstone tools stubbed): getSopClassHandlerModule -> getDisplaySetsFromSeries ->
//    displaySet.load() (measurements, their images, isRehydratable) -> the command
//    hydrateStructuredReport (what "track measurements" runs) into a recording
//    measurementService;
//  * the SEG, retrieved whole by WADO-RS (multipart/related; type="application/dicom"), read by
//    adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer onto the CT image ids.
//
// The JSON (SOP Instance UIDs name the CT images):
//   series       the study's series (QIDO-RS)
//   ct           seriesInstanceUID, images, frameOfReferenceUID, sopInstanceUIDs (by Instance Number)
//   sr           seriesInstanceUID, sopInstanceUID, sopClassUID, template
//   adapters     generateToolState: threw, error, toolStates {toolType: [{sopInstanceUID,
//                imageSOPInstanceUID, label, finding, points}]}
//   ohif         the SR extension: handler, load {threw, error}, isRehydratable, imageLibrary,
//                previewAnnotations (DICOMSRDisplay annotations added), measurements
//                [{trackingIdentifier, trackingUniqueIdentifier, referencedSOPInstanceUID,
//                valueType, graphicType, graphicCode, points, coords, toolTypes (the adapters'
//                tool types for it), loaded (onto a CT image), imageSOPInstanceUID, labels}],
//                initialMeasurement (what the SR viewport opens on: trackingIdentifier,
//                displaySetInstanceUID, imageSOPInstanceUID), hydration {threw, error,
//                byToolType, measurements [{toolType, imageSOPInstanceUID, label, finding,
//                points}], seriesInstanceUIDs}
//   seg          seriesInstanceUID, sopInstanceUID, transferSyntaxUID, numberOfFrames, segments
//                [{number, label}], framesBySource {CT SOP UID: frames}, framesNotInCT,
//                adapters (createFromDICOMSegBuffer: threw, error, segmentsOnImage {CT SOP UID:
//                [segment numbers]}, segments, nonZeroPixels, overlappingSegments)
//   console      the libraries' warnings and errors; consoleQuiet: how many log/debug lines
// Exit status 0 when the JSON was printed (what the code made of the objects, errors included,
// is in it); 2 on bad arguments or a server that does not answer.
import { createRequire } from 'node:module';
import { parseArgs } from 'node:util';
import dcmjs from 'dcmjs';
import * as csCore from '@cornerstonejs/core';
import { adaptersSR, adaptersSEG } from '@cornerstonejs/adapters';

const { values: opt } = parseArgs({ options: {
  dicomweb: { type: 'string' }, study: { type: 'string' },
} });
if (!opt.dicomweb || !opt.study) {
  process.stderr.write('usage: node sr_check.mjs --dicomweb URL --study STUDY_UID\n');
  process.exit(2);
}
const ROOT = opt.dicomweb.replace(/\/+$/, '');
const STUDY = opt.study;
const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

// ------------------------------------------------------------------ console capture
// The libraries write to the console (warnings about what they skip, debug dumps): keep their
// warnings and errors in the JSON (the first 200), count the rest; stdout is the JSON's alone.
const realLog = console.log;
const logged = [];
const quiet = { log: 0, debug: 0 };
for (const level of ['log', 'info', 'warn', 'error', 'debug']) {
  console[level] = (...args) => {
    if (level in quiet) quiet[level] += 1;
    else if (logged.length < 200) logged.push({ level, text: args.map(fmt).join(' ').slice(0, 500) });
  };
}
function fmt(x) {
  if (x instanceof Error) return `${x.name}: ${x.message}`;
  if (typeof x === 'string') return x;
  try { return JSON.stringify(x)?.slice(0, 200) ?? String(x); } catch { return String(x); }
}
const errorText = (e) => (e instanceof Error ? `${e.name}: ${e.message} @ ${(e.stack || '').split('\n')[1]?.trim() ?? ''}` : String(e));

// ------------------------------------------------------------------ DICOMweb
async function get(path, accept) {
  const res = await fetch(ROOT + path, { headers: { Accept: accept } });
  if (!res.ok) throw new Error(`GET ${path}: HTTP ${res.status}`);
  return res;
}
const json = async (path) => (await get(path, 'application/dicom+json')).json();
const tagValue = (obj, tag) => obj[tag]?.Value?.[0];

/** The parts of a multipart/related body (RFC 2387), as Buffers. */
function multipartParts(body, contentType) {
  const m = /boundary=(?:"([^"]+)"|([^;\s]+))/i.exec(contentType || '');
  if (!m) throw new Error(`no boundary in Content-Type ${contentType}`);
  const delimiter = Buffer.from(`--${m[1] || m[2]}`);
  const parts = [];
  let at = body.indexOf(delimiter);
  while (at >= 0) {
    let start = at + delimiter.length;
    if (body.slice(start, start + 2).toString() === '--') break;          // close delimiter
    const headerEnd = body.indexOf('\r\n\r\n', start);
    if (headerEnd < 0) break;
    const headers = body.slice(start, headerEnd).toString('latin1');
    start = headerEnd + 4;
    const next = body.indexOf(Buffer.concat([Buffer.from('\r\n'), delimiter]), start);
    const end = next >= 0 ? next : body.length;
    parts.push({ headers, data: body.slice(start, end) });
    at = next >= 0 ? next + 2 : -1;
  }
  return parts;
}
const toArrayBuffer = (b) => b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);

async function seriesMetadata(seriesUID) {
  const items = await json(`/studies/${STUDY}/series/${seriesUID}/metadata`);
  return items.map((item) => DicomMetaDictionary.naturalizeDataset(item));
}

const out = { study: STUDY, dicomweb: ROOT, series: [], ct: null, sr: null, adapters: null,
  ohif: null, seg: null, console: logged, consoleQuiet: quiet };
try {
  const series = await json(`/studies/${STUDY}/series`);
  out.series = series.map((s) => ({ seriesInstanceUID: tagValue(s, '0020000E'),
    modality: tagValue(s, '00080060'), description: tagValue(s, '0008103E') ?? null }));
} catch (e) {
  process.stderr.write(`sr_check: ${ROOT} did not list study ${STUDY}: ${e.message}\n`);
  process.exit(2);
}
const one = (modality) => out.series.find((s) => s.modality === modality)?.seriesInstanceUID;

// ------------------------------------------------------------------ the CT, as OHIF indexes it
const ctSeriesUID = one('CT');
const ct = ctSeriesUID ? await seriesMetadata(ctSeriesUID) : [];
ct.sort((a, b) => Number(a.InstanceNumber) - Number(b.InstanceNumber));
const imageIdOf = (ds) => `wadors:${ROOT}/studies/${ds.StudyInstanceUID}/series/` +
  `${ds.SeriesInstanceUID}/instances/${ds.SOPInstanceUID}/frames/1`;
const byImageId = new Map(ct.map((ds) => [imageIdOf(ds), ds]));
const imageIds = [...byImageId.keys()];
const sopOf = (imageId) => byImageId.get(imageId)?.SOPInstanceUID ?? null;
out.ct = ctSeriesUID ? { seriesInstanceUID: ctSeriesUID, images: ct.length,
  frameOfReferenceUID: ct[0]?.FrameOfReferenceUID ?? null,
  sopInstanceUIDs: ct.map((ds) => ds.SOPInstanceUID) } : null;

const custom = new Map();
const num = (v) => (Array.isArray(v) ? v.map(Number) : v === undefined ? undefined : Number(v));
function ctModule(type, imageId) {
  const c = custom.get(`${type}|${imageId}`);
  if (c) return c;
  const ds = byImageId.get(imageId);
  if (!ds) return undefined;
  const iop = num(ds.ImageOrientationPatient);
  const ps = num(ds.PixelSpacing);
  switch (type) {
    case 'instance': return ds;
    case 'imagePlaneModule': return {
      frameOfReferenceUID: ds.FrameOfReferenceUID, rows: ds.Rows, columns: ds.Columns,
      imageOrientationPatient: iop, rowCosines: iop.slice(0, 3), columnCosines: iop.slice(3, 6),
      imagePositionPatient: num(ds.ImagePositionPatient), sliceThickness: num(ds.SliceThickness),
      pixelSpacing: ps, rowPixelSpacing: ps[0], columnPixelSpacing: ps[1], usingDefaultValues: false };
    case 'generalImageModule': return { sopInstanceUID: ds.SOPInstanceUID, instanceNumber: ds.InstanceNumber };
    case 'generalSeriesModule': return { seriesInstanceUID: ds.SeriesInstanceUID, modality: ds.Modality,
      studyInstanceUID: ds.StudyInstanceUID };
    case 'sopCommonModule': return { sopInstanceUID: ds.SOPInstanceUID, sopClassUID: ds.SOPClassUID };
    case 'imagePixelModule': return { rows: ds.Rows, columns: ds.Columns, samplesPerPixel: ds.SamplesPerPixel,
      bitsAllocated: ds.BitsAllocated, bitsStored: ds.BitsStored, highBit: ds.HighBit,
      pixelRepresentation: ds.PixelRepresentation, photometricInterpretation: ds.PhotometricInterpretation };
    case 'modalityLutModule': return { rescaleIntercept: num(ds.RescaleIntercept), rescaleSlope: num(ds.RescaleSlope) };
    case 'voiLutModule': return {};
    case 'frameNumber': return 1;
    default: return undefined;
  }
}
csCore.metaData.addProvider((type, imageId) => ctModule(type, imageId), 10000);
const metadataProvider = {
  get: (type, imageId) => csCore.metaData.get(type, imageId),
  add: (imageId, type, value) => custom.set(`${type}|${imageId}`, value),
  addCustomMetadata: (imageId, type, value) => custom.set(`${type}|${imageId}`, value),
};
const sopToImageId = Object.fromEntries(ct.map((ds) => [`${ds.SOPInstanceUID}:1`, imageIdOf(ds)]));

// ------------------------------------------------------------------ the SR
const srSeriesUID = one('SR');
const srDs = srSeriesUID ? (await seriesMetadata(srSeriesUID)).at(-1) : null;
if (srDs) {
  out.sr = { seriesInstanceUID: srSeriesUID, sopInstanceUID: srDs.SOPInstanceUID,
    sopClassUID: srDs.SOPClassUID, template: srDs.ContentTemplateSequence?.[0]?.TemplateIdentifier ?? null };

  // 1. the adapters alone
  const { MeasurementReport } = adaptersSR.Cornerstone3D;
  out.adapters = { threw: false, error: null, toolStates: {} };
  try {
    const states = MeasurementReport.generateToolState(srDs, sopToImageId, csCore.metaData);
    for (const [toolType, list] of Object.entries(states)) {
      out.adapters.toolStates[toolType] = list.map((s) => ({
        sopInstanceUID: s.sopInstanceUid ?? null,
        imageSOPInstanceUID: sopOf(s.annotation?.metadata?.referencedImageId),
        label: s.annotation?.data?.label ?? null, finding: s.finding?.CodeMeaning ?? null,
        points: (s.annotation?.data?.handles?.points || []).length }));
    }
  } catch (e) {
    out.adapters.threw = true;
    out.adapters.error = errorText(e);
  }

  // 2. the OHIF SR extension
  out.ohif = await runOhifExtension(srDs);
}

async function runOhifExtension(sr) {
  const result = { handler: null, load: { threw: false, error: null }, isRehydratable: null,
    measurements: [], imageLibrary: null, previewAnnotations: 0, initialMeasurement: null,
    hydration: null };
  const require = createRequire(import.meta.url);
  const Module = require('module');
  const annotationsAdded = [];
  const rawMeasurements = [];
  // Anything of the OHIF app the extension touches but this harness does not provide.
  const universal = (name) => new Proxy(function () {}, {
    get: (t, p) => (p === Symbol.toPrimitive ? () => name : p === '__esModule' ? false
      : p === 'then' ? undefined : p in t ? t[p] : universal(`${name}.${String(p)}`)),
    apply: () => universal(`${name}()`),
    construct: () => universal(`new ${name}`),
  });
  const withFallback = (obj, name) => new Proxy(obj, { get: (t, p) => (p in t ? t[p]
    : p === '__esModule' ? true : p === 'then' ? undefined : universal(`${name}.${String(p)}`)) });
  const sopClassDictionary = {
    BasicTextSR: '1.2.840.10008.5.1.4.1.1.88.11', EnhancedSR: '1.2.840.10008.5.1.4.1.1.88.22',
    ComprehensiveSR: '1.2.840.10008.5.1.4.1.1.88.33', Comprehensive3DSR: '1.2.840.10008.5.1.4.1.1.88.34',
  };
  let guid = 0;
  const utils = withFallback({ sopClassDictionary, sortStudyInstances: () => {},
    guid: () => `guid-${++guid}`, sortDisplaySetsCopy: (a) => [...a] }, '@ohif/core.utils');
  // OHIF's MetadataProvider.getUIDsFromImageID for wadors: ids
  const getUIDsFromImageID = (imageId) => ({ SOPInstanceUID: sopOf(imageId) ?? undefined, frameNumber: undefined });
  const DicomMetadataStore = { getInstance: (_st, _se, sop) => (sop === sr.SOPInstanceUID ? sr : undefined) };
  const stubs = {
    '@ohif/core': withFallback({ utils, DicomMetadataStore,
      classes: withFallback({ MetadataProvider: { getUIDsFromImageID } }, 'classes'),
      default: withFallback({ utils, DicomMetadataStore }, '@ohif/core.default') }, '@ohif/core'),
    '@ohif/extension-cornerstone': withFallback({ Enums: withFallback({
      CORNERSTONE_3D_TOOLS_SOURCE_NAME: 'Cornerstone3DTools', CORNERSTONE_3D_TOOLS_SOURCE_VERSION: '0.1' },
    'Enums') }, '@ohif/extension-cornerstone'),
    '@ohif/i18n': withFallback({ default: { t: (s) => s }, t: (s) => s }, '@ohif/i18n'),
    '@ohif/ui-next': universal('@ohif/ui-next'),
    '@ohif/core/src/contextProviders/SystemProvider': universal('SystemProvider'),
    '@cornerstonejs/tools': withFallback({ annotation: withFallback({
      state: withFallback({ addAnnotation: (a) => annotationsAdded.push(a) }, 'annotation.state'),
      locking: withFallback({ setAnnotationLocked: () => {} }, 'locking') }, 'annotation') },
    '@cornerstonejs/tools'),
    react: universal('react'),
  };
  const originalLoad = Module._load;
  Module._load = function (request, parent, isMain) {
    if (Object.prototype.hasOwnProperty.call(stubs, request)) return stubs[request];
    return originalLoad.call(this, request, parent, isMain);
  };
  try {
    const umd = require('@ohif/extension-cornerstone-dicom-sr/dist/ohif-extension-cornerstone-dicom-sr.umd.js');
    const ext = umd.default || umd;
    const ct0 = ct[0] || {};
    const ctDisplaySet = { displaySetInstanceUID: 'ct-display-set', SeriesInstanceUID: ct0.SeriesInstanceUID,
      StudyInstanceUID: ct0.StudyInstanceUID, FrameOfReferenceUID: ct0.FrameOfReferenceUID, Modality: 'CT',
      imageIds, images: ct, instances: ct, isReconstructable: true };
    const displaySets = new Map(ct.length ? [[ctDisplaySet.displaySetInstanceUID, ctDisplaySet]] : []);
    // the Cornerstone3DTools mappings OHIF's cornerstone extension registers
    const mapped = ['Length', 'Crosshairs', 'Bidirectional', 'EllipticalROI', 'CircleROI', 'ArrowAnnotate',
      'CobbAngle', 'Angle', 'RectangleROI', 'PlanarFreehandROI', 'SplineROI', 'CalibrationLine',
      'LivewireContour', 'Probe', 'UltrasoundDirectionalTool', 'UltrasoundPleuraBLineTool', 'SegmentBidirectional'];
    const mappings = mapped.map((annotationType) => ({ annotationType, toMeasurementSchema: () => ({}) }));
    const dataSource = { getImageIdsForDisplaySet: (ds) => ds.imageIds || [],
      retrieve: { bulkDataURI: async () => { throw new Error('bulk data is not expected in an SR'); } } };
    const servicesManager = { services: {
      displaySetService: {
        get activeDisplaySets() { return [...displaySets.values()]; },
        subscribe: () => ({ unsubscribe() {} }), EVENTS: { DISPLAY_SETS_ADDED: 'added' },
        getDisplaySetByUID: (uid) => displaySets.get(uid),
        getDisplaySetsBy: (f) => [...displaySets.values()].filter(f),
        addDisplaySets: (...sets) => sets.forEach((s) => displaySets.set(s.displaySetInstanceUID, s)),
      },
      measurementService: {
        getSourceMappings: () => mappings, getSource: () => ({ name: 'Cornerstone3DTools' }),
        addRawMeasurement: (source, annotationType, data) => {
          rawMeasurements.push({ annotationType, annotation: data.annotation });
          return data.annotation.annotationUID;
        },
      },
      // OHIF's defaults (extensions/cornerstone customizations)
      customizationService: { getCustomization: (k) => ({ codingValues: {},
        'panelMeasurement.disableEditing': false,
        onBeforeSRAddMeasurement: ({ measurement }) => measurement })[k] },
    } };
    const extensionManager = { getDataSources: () => [dataSource], getActiveDataSource: () => [dataSource] };
    const commandsManager = { runCommand: () => {} };

    const handler = ext.getSopClassHandlerModule({ servicesManager, extensionManager })
      .find((h) => h.sopClassUids.includes(sr.SOPClassUID));
    if (!handler) {
      result.load = { threw: true, error: `SOP Class ${sr.SOPClassUID} has no handler in the SR extension` };
      return result;
    }
    result.handler = handler.name;
    const [srDisplaySet] = handler.getDisplaySetsFromSeries([sr]);
    displaySets.set(srDisplaySet.displaySetInstanceUID, srDisplaySet);
    try {
      await srDisplaySet.load();
    } catch (e) {
      result.load = { threw: true, error: errorText(e) };
    }
    const { MeasurementReport } = adaptersSR.Cornerstone3D;
    const toolTypesOf = (m) => {
      const byId = MeasurementReport.getAdapterForTrackingIdentifier(m.TrackingIdentifier || '');
      const byType = MeasurementReport.getAdaptersForTypes(m.graphicCode, m.graphicType, m.pointsLength) || [];
      return [...new Set([byId?.toolType, ...byType.map((a) => a.toolType)].filter(Boolean))];
    };
    result.isRehydratable = srDisplaySet.isRehydratable ?? null;
    result.imageLibrary = (srDisplaySet.referencedImages || []).map((r) => r.ReferencedSOPInstanceUID);
    result.previewAnnotations = annotationsAdded.length;
    result.measurements = (srDisplaySet.measurements || []).map((m) => ({
      trackingIdentifier: m.TrackingIdentifier ?? null,
      trackingUniqueIdentifier: m.TrackingUniqueIdentifier ?? null,
      referencedSOPInstanceUID: m.coords?.[0]?.ReferencedSOPSequence?.ReferencedSOPInstanceUID ?? null,
      valueType: m.coords?.[0]?.ValueType ?? null, graphicType: m.graphicType ?? null,
      graphicCode: m.graphicCode ?? null, points: m.pointsLength ?? null, coords: m.coords?.length ?? 0,
      toolTypes: toolTypesOf(m), loaded: !!m.loaded, imageSOPInstanceUID: sopOf(m.imageId),
      labels: (m.labels || []).map((l) => `${l.label}: ${l.value}`) }));
    // The SR viewport opens on measurements[0]: its display set and image (viewReference).
    const first = srDisplaySet.measurements?.[0];
    if (first) {
      result.initialMeasurement = { trackingIdentifier: first.TrackingIdentifier ?? null,
        displaySetInstanceUID: first.displaySetInstanceUID ?? null,
        imageSOPInstanceUID: sopOf(first.viewReference?.referencedImageId ?? first.imageId) };
    }
    if (srDisplaySet.isRehydratable && !result.load.threw) {
      const commands = ext.getCommandsModule({ servicesManager, extensionManager, commandsManager });
      const hydration = { threw: false, error: null, byToolType: {}, measurements: [],
        seriesInstanceUIDs: null };
      try {
        const r = commands.actions.hydrateStructuredReport({ displaySetInstanceUID: srDisplaySet.displaySetInstanceUID });
        hydration.seriesInstanceUIDs = r?.SeriesInstanceUIDs ?? null;
      } catch (e) {
        hydration.threw = true;
        hydration.error = errorText(e);
      }
      for (const { annotationType, annotation } of rawMeasurements) {
        hydration.byToolType[annotationType] = (hydration.byToolType[annotationType] || 0) + 1;
        hydration.measurements.push({ toolType: annotationType,
          imageSOPInstanceUID: sopOf(annotation.metadata?.referencedImageId),
          label: annotation.data?.label ?? null, finding: annotation.data?.finding?.CodeMeaning ?? null,
          points: annotation.data?.handles?.points?.length ?? 0 });
      }
      result.hydration = hydration;
    }
  } catch (e) {
    result.load = { threw: true, error: errorText(e) };
  } finally {
    Module._load = originalLoad;
  }
  return result;
}

// ------------------------------------------------------------------ the SEG
const segSeriesUID = one('SEG');
if (segSeriesUID) {
  const [meta] = await seriesMetadata(segSeriesUID);
  const seg = out.seg = { seriesInstanceUID: segSeriesUID, sopInstanceUID: meta.SOPInstanceUID,
    transferSyntaxUID: null, numberOfFrames: null, segments: [], framesBySource: {},
    framesNotInCT: 0, adapters: null };
  const res = await get(`/studies/${STUDY}/series/${segSeriesUID}/instances/${meta.SOPInstanceUID}`,
    'multipart/related; type="application/dicom"');
  const parts = multipartParts(Buffer.from(await res.arrayBuffer()), res.headers.get('content-type'));
  if (parts.length !== 1) throw new Error(`WADO-RS gave ${parts.length} parts for one SEG instance`);
  const buffer = toArrayBuffer(parts[0].data);
  const file = DicomMessage.readFile(buffer, { untilTag: '7FE00010' });
  const ds = DicomMetaDictionary.naturalizeDataset(file.dict);
  seg.transferSyntaxUID = file.meta['00020010']?.Value?.[0] ?? null;
  seg.numberOfFrames = Number(ds.NumberOfFrames);
  seg.segments = [].concat(ds.SegmentSequence || []).map((s) => ({ number: s.SegmentNumber, label: s.SegmentLabel }));
  const known = new Set(ct.map((c) => c.SOPInstanceUID));
  for (const fg of [].concat(ds.PerFrameFunctionalGroupsSequence || [])) {
    const derivation = [].concat(fg.DerivationImageSequence || [])[0];
    const source = [].concat(derivation?.SourceImageSequence || [])[0]?.ReferencedSOPInstanceUID ?? null;
    seg.framesBySource[source] = (seg.framesBySource[source] || 0) + 1;
    if (!known.has(source)) seg.framesNotInCT += 1;
  }
  seg.adapters = { threw: false, error: null, segmentsOnImage: {}, segments: [], nonZeroPixels: 0,
    overlappingSegments: null };
  try {
    const r = await adaptersSEG.Cornerstone3D.Segmentation.createFromDICOMSegBuffer(imageIds, buffer,
      { metadataProvider });
    seg.adapters.overlappingSegments = r.overlappingSegments ?? null;
    r.segmentsOnFrame.forEach((segments, i) => {
      if (segments && segments.length) seg.adapters.segmentsOnImage[sopOf(imageIds[i])] = [...segments];
    });
    seg.adapters.segments = (r.segMetadata?.data || []).filter(Boolean)
      .map((d) => ({ number: d.SegmentNumber, label: d.SegmentLabel }));
    for (const image of r.labelMapImages?.[0] || []) {
      const px = image.getPixelData ? image.getPixelData() : image.voxelManager?.getScalarData?.();
      if (px) for (const v of px) if (v) seg.adapters.nonZeroPixels += 1;
    }
  } catch (e) {
    seg.adapters.threw = true;
    seg.adapters.error = errorText(e);
  }
}

realLog(JSON.stringify(out));
