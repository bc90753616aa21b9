// Prints, as JSON, what OHIF's DICOM SR extension takes from a TID 1500 SR: for each
// measurement group of the Imaging Measurements container (126010 / 125007), its
// tracking identifier, the first SCOORD or SCOORD3D item (the place OHIF shows) and
// its text items; plus the text items at the root. Parsed with dcmjs, as OHIF does.
// Usage: node sr_measurements.js FILE.dcm
"use strict";
const fs = require("fs");
const dcmjs = require("dcmjs");

const asArray = (value) => (value === undefined || value === null ? [] : Array.isArray(value) ? value : [value]);
const first = (value) => asArray(value)[0] || {};
const codeValue = (item) => first(item.ConceptNameCodeSequence).CodeValue;

const buffer = fs.readFileSync(process.argv[2]);
const arrayBuffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
const message = dcmjs.data.DicomMessage.readFile(arrayBuffer);
const sr = dcmjs.data.DicomMetaDictionary.naturalizeDataset(message.dict);
const root = asArray(sr.ContentSequence);
const imagingMeasurements = root.find((item) => codeValue(item) === "126010");
const groups = asArray(imagingMeasurements && imagingMeasurements.ContentSequence)
  .filter((item) => codeValue(item) === "125007")
  .map((group) => {
    const content = asArray(group.ContentSequence);
    const graphic = content.find((item) => item.ValueType === "SCOORD" || item.ValueType === "SCOORD3D");
    const tracking = content.find((item) => codeValue(item) === "112039");
    return {
      trackingIdentifier: tracking ? tracking.TextValue : null,
      graphic: graphic
        ? {
            valueType: graphic.ValueType,
            graphicType: graphic.GraphicType,
            graphicData: Array.from(asArray(graphic.GraphicData), Number),
            frameOfReferenceUID: graphic.ReferencedFrameOfReferenceUID || null,
            conceptName: first(graphic.ConceptNameCodeSequence).CodeMeaning,
          }
        : null,
      texts: content.filter((item) => item.ValueType === "TEXT").map((item) => item.TextValue),
    };
  });
const rootTexts = root.filter((item) => item.ValueType === "TEXT").map((item) => item.TextValue);
process.stdout.write(JSON.stringify({ seriesDescription: sr.SeriesDescription, rootTexts, groups }));
