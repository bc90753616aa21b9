"""Coded concepts for the keys pipelines use in :class:`spine_node.inference.findings.Findings`.

Pipelines name structures and findings by short keys (``"C3"``, ``"pedicle"``,
``"fracture"``); this module maps each key to the coded concepts DICOM SEG and SR need.

Sources, in order of preference:

* SNOMED CT (``SCT``) and DICOM (``DCM``) codes that ship in pydicom's code dictionary
  (``pydicom.sr.codedict.codes``), which is generated from the DICOM standard's context
  groups; the tests check every one of those against it.
* SNOMED CT codes the standard's context groups do not list but SNOMED CT defines:
  ``3572006`` vertebral body, ``360499006`` intervertebral disc, ``72704001`` fracture
  (morphologic abnormality) and ``87642003`` dislocation (morphologic abnormality).
* The private scheme :data:`PRIVATE_SCHEME` (``99SPINENODE``) where SNOMED CT has no
  concept for the structure. Its values never change meaning once released; add new
  values, never reuse old ones.

Segmented Property Category follows DICOM CID 7150; Segmented Property Type comes from
the context group of that category (CID 7191 tissue types, CID 7603 vertebrae, CID 217
visual explanation for the saliency map).

Objects that use a private code declare the scheme in Coding Scheme Identification
Sequence (0008,0110). Validators that only know the standard's schemes (dciodvfy) still
warn "Unrecognized defined term" for it; that warning is expected.

Private codes (scheme ``99SPINENODE``, version ``1``):

===============  ==========================  ==========================================
code value       code meaning                used for
===============  ==========================  ==========================================
``SN-0001``      Prevertebral soft tissue    segment ``prevertebral_soft_tissue``
``SN-0101``      AI analysis                 concept: whether the pipeline analysed the input
``SN-0102``      Site assessment             concept: what the pipeline could say about a site
``SN-0103``      Assessed                    site status: the site was assessed
``SN-0104``      Not in field of view        site status: the site is outside the imaged field
``SN-0105``      Not assessable              site status: in the field, but not assessable
===============  ==========================  ==========================================

"Not performed" (the value of ``SN-0101`` when a pipeline abstained or failed) is SNOMED
CT ``262008008``. SNOMED CT has no concept for "outside the imaged field" or for an
assessment status of an anatomical site, hence ``SN-0102`` .. ``SN-0105``.
"""

from __future__ import annotations

from dataclasses import dataclass

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from spine_node.node.errors import ResultsError

PRIVATE_SCHEME = "99SPINENODE"
PRIVATE_SCHEME_VERSION = "1"


class UnknownCodeError(ResultsError):
    """A structure or finding key has no coded concept; the message names the key."""


def private_scheme_identification() -> Dataset:
    """An item of Coding Scheme Identification Sequence (0008,0110) for the private scheme."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "spine-node private codes"
    item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
    item.CodingSchemeResponsibleOrganization = "spine-node project"
    return item


def uses_private_scheme(dataset: Dataset) -> bool:
    """True if any code in ``dataset`` (at any depth) is from the private scheme."""
    return any(
        element.keyword == "CodingSchemeDesignator" and element.value == PRIVATE_SCHEME
        for element in dataset.iterall()
    )


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(
        value=value,
        scheme_designator=PRIVATE_SCHEME,
        meaning=meaning,
        scheme_version=PRIVATE_SCHEME_VERSION,
    )


def _std(code: object) -> CodedConcept:
    """A highdicom concept from a pydicom ``Code`` (keeps value, scheme and meaning)."""
    return CodedConcept.from_code(code)  # type: ignore[arg-type]


# CID 7150 Segmentation Property Category.
CATEGORY_TISSUE = _std(codes.SCT.Tissue)
CATEGORY_ANATOMICAL_STRUCTURE = _std(codes.SCT.AnatomicalStructure)
CATEGORY_SUBSTANCE = _std(codes.SCT.Substance)
CATEGORY_SPATIAL = _std(codes.SCT.SpatialAndRelationalConcept)


@dataclass(frozen=True)
class StructureCode:
    """How one structure key is described in a SEG segment."""

    key: str
    label: str
    category: CodedConcept
    property_type: CodedConcept
    # CIELab display colour (L*, a*, b*) for viewers; optional.
    color_lab: tuple[float, float, float] | None = None


def _vertebra_codes() -> dict[str, CodedConcept]:
    table: dict[str, CodedConcept] = {}
    for region, count in (("C", 7), ("T", 12), ("L", 5)):
        for level in range(1, count + 1):
            key = f"{region}{level}"
            table[key] = _std(getattr(codes.SCT, f"{key}Vertebra"))
    return table


VERTEBRAE: dict[str, CodedConcept] = _vertebra_codes()

# Structures segmented on radiographs (AP, LAT) and by the tissue model.
_STRUCTURES: dict[str, tuple[str, CodedConcept, CodedConcept]] = {
    "vertebral_body": (
        "Vertebral body",
        CATEGORY_ANATOMICAL_STRUCTURE,
        _sct("3572006", "Vertebral body"),
    ),
    "pedicle": (
        "Pedicle",
        CATEGORY_ANATOMICAL_STRUCTURE,
        _std(codes.SCT.PedicleOfVertebra),
    ),
    "spinous_process": (
        "Spinous process",
        CATEGORY_ANATOMICAL_STRUCTURE,
        _std(codes.SCT.SpinousProcessOfVertebra),
    ),
    # The posterior elements are the vertebral arch: pedicles, laminae and processes.
    "posterior_elements": (
        "Posterior elements",
        CATEGORY_ANATOMICAL_STRUCTURE,
        _std(codes.SCT.ArchOfVertebra),
    ),
    "intervertebral_disc": (
        "Intervertebral disc",
        CATEGORY_ANATOMICAL_STRUCTURE,
        _sct("360499006", "Intervertebral disc"),
    ),
    "spinal_canal": (
        "Spinal canal",
        CATEGORY_ANATOMICAL_STRUCTURE,
        _std(codes.SCT.VertebralCanal),
    ),
    "prevertebral_soft_tissue": (
        "Prevertebral soft tissue",
        CATEGORY_TISSUE,
        _private("SN-0001", "Prevertebral soft tissue"),
    ),
    "bone": ("Bone", CATEGORY_TISSUE, _std(codes.SCT.BoneTissue)),
    "soft_tissue": ("Soft tissue", CATEGORY_TISSUE, _std(codes.SCT.SoftTissue)),
    # The open beam is the detector area the beam reaches through air only.
    "open_beam": ("Open beam", CATEGORY_SUBSTANCE, _std(codes.SCT.Air)),
    # CID 217 Visual Explanation: a heat map of what drove a classifier's output.
    "saliency": ("Saliency", CATEGORY_SPATIAL, _std(codes.DCM.Saliency)),
}

# Distinct, stable display colours (CIELab) so viewers show the same colours every run.
_PALETTE: tuple[tuple[float, float, float], ...] = (
    (55.0, 80.0, 67.0),
    (88.0, -79.0, 81.0),
    (32.0, 79.0, -108.0),
    (97.0, -21.0, 94.0),
    (60.0, 98.0, -61.0),
    (91.0, -48.0, -14.0),
    (67.0, 43.0, 74.0),
    (46.0, -52.0, 50.0),
)


def structure(key: str) -> StructureCode:
    """The segment description for structure ``key``; :class:`UnknownCodeError` if none."""
    keys = list(VERTEBRAE) + list(_STRUCTURES)
    if key in VERTEBRAE:
        property_type = VERTEBRAE[key]
        label = f"{key} vertebra"
        category = CATEGORY_ANATOMICAL_STRUCTURE
    elif key in _STRUCTURES:
        label, category, property_type = _STRUCTURES[key]
    else:
        raise UnknownCodeError(
            f"no coded concept for structure key {key!r}; known keys: {', '.join(keys)}"
        )
    color = _PALETTE[keys.index(key) % len(_PALETTE)]
    return StructureCode(key, label, category, property_type, color)


def structure_keys() -> tuple[str, ...]:
    """Every structure key this module can code."""
    return tuple(VERTEBRAE) + tuple(_STRUCTURES)


# Finding kinds (classifier outputs) for SR finding types and qualitative evaluations.
_FINDINGS: dict[str, CodedConcept] = {
    "fracture": _sct("72704001", "Fracture"),
    "dislocation": _sct("87642003", "Dislocation"),
    # "damage" is the AP + LAT pair classifier's abnormal class (CID 222 Normality).
    "damage": _std(codes.SCT.Abnormal),
    "normal": _std(codes.SCT.Normal),
}


def finding(kind: str) -> CodedConcept:
    """The coded concept for finding ``kind``; :class:`UnknownCodeError` if none."""
    try:
        return _FINDINGS[kind]
    except KeyError:
        raise UnknownCodeError(
            f"no coded concept for finding kind {kind!r}; known kinds: {', '.join(_FINDINGS)}"
        ) from None


def finding_kinds() -> tuple[str, ...]:
    return tuple(_FINDINGS)


# Radiographic views a pipeline may report a status for (CID 4010 DX View).
VIEWS: dict[str, CodedConcept] = {
    "AP": _std(codes.SCT.AnteroPosterior),
    "PA": _std(codes.SCT.PosteroAnterior),
    "LAT": _std(codes.SCT.LateralProjection),
    "LL": _std(codes.SCT.LeftLateral),
    "RL": _std(codes.SCT.RightLateral),
}


def finding_site(site: str | None) -> CodedConcept:
    """The site of a finding or status: a vertebra, structure or view key, or the spine."""
    if site is None:
        return _std(codes.SCT.Spine)
    if site in VIEWS:
        return VIEWS[site]
    return structure(site).property_type


# SR vocabulary.
PROBABILITY = _std(codes.DCM.Probability)
UNIT_NO_UNITS = _std(codes.UCUM.NoUnits)
PRESENT = _std(codes.SCT.Present)
ABSENT = _std(codes.SCT.Absent)
INDETERMINATE = _std(codes.SCT.Indeterminate)
DEVICE = _std(codes.DCM.Device)
COMMENT = _std(codes.DCM.Comment)
ALGORITHM_FAMILY = _std(codes.DCM.ArtificialIntelligence)
SPINE = _std(codes.SCT.Spine)
#: a SCOORD3D point at the centre of what a finding is about (e.g. a vertebra's centroid)
CENTER = _std(codes.DCM.Center)

# Whether the analysis ran, and what it could say about each site (Findings.site_status).
AI_ANALYSIS = _private("SN-0101", "AI analysis")
NOT_PERFORMED = _std(codes.SCT.NotPerformed)
SITE_ASSESSMENT = _private("SN-0102", "Site assessment")
_ASSESSMENTS: dict[str, CodedConcept] = {
    "assessed": _private("SN-0103", "Assessed"),
    "not in field": _private("SN-0104", "Not in field of view"),
    "not assessable": _private("SN-0105", "Not assessable"),
}


def assessment(value: str) -> CodedConcept:
    """The coded status of a site (an ``AssessmentValues`` value); UnknownCodeError if none."""
    try:
        return _ASSESSMENTS[str(value)]
    except KeyError:
        raise UnknownCodeError(
            f"no coded concept for site assessment {value!r}; known: {', '.join(_ASSESSMENTS)}"
        ) from None


def procedure_reported(modality: str) -> CodedConcept:
    """CID 100 procedure for the modality of the source images."""
    if modality == "CT":
        return _std(codes.LN.CTUnspecifiedBodyRegion)
    if modality in ("CR", "DX", "DR", "RG"):
        return _std(codes.LN.XRUnspecifiedBodyRegion)
    return _std(codes.SCT.ImagingProcedure)
