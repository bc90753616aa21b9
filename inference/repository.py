"""The model repository: one folder per model under an engines directory.

::

    engines/
      ct-cspine-seg/
        model.yaml      the card (spine_node.inference.card.ModelCard)
        model.onnx      the graph and weights every backend starts from
        model.pt        optional torch state dict for the reference backend
        plans/          TensorRT plans built on the GPU that runs them (never committed)

:class:`ModelRepository` lists, loads and validates models; :func:`import_model` checks a
card and an ONNX file against each other and copies both in.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from spine_node.engines import ENGINES_DIR
from spine_node.inference.card import ModelCard, ModelCardError, TensorSpec
from spine_node.inference.errors import InferenceError

log = logging.getLogger(__name__)

CARD_FILE = "model.yaml"
ONNX_FILE = "model.onnx"
STATE_DICT_FILE = "model.pt"
PLANS_DIR = "plans"


class RepositoryError(InferenceError):
    """The model repository or a model in it is unusable; the message says why."""


class ModelNotFoundError(RepositoryError, KeyError):
    """No model of that name in the engines directory."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelImportError(RepositoryError):
    """A model could not be imported (bad card, ONNX that does not match it, name taken)."""


@dataclass(frozen=True)
class TensorSignature:
    """An ONNX graph input or output: ``-1`` marks a dynamic (symbolic or unknown) dim."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class OnnxSignature:
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]
    opset: int | None = None


@dataclass(frozen=True)
class ValidationReport:
    """The result of validating one model folder; ``problems`` is empty when it is usable."""

    folder: Path
    card: ModelCard | None
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def name(self) -> str:
        return self.card.name if self.card is not None else self.folder.name


def resolve_engines_dir(path: Path | str | None = None) -> Path:
    """The engines directory to use.

    ``None`` is the packaged folder (:data:`engines.ENGINES_DIR`). The configuration's
    default, the relative path ``engines``, also means the packaged folder when the
    working directory has no ``engines`` folder (an installed node run from elsewhere).
    """
    if path is None:
        return ENGINES_DIR
    path = Path(path)
    if not path.is_absolute() and path == Path("engines") and not path.is_dir():
        return ENGINES_DIR
    return path


# -- hashing -----------------------------------------------------------------------------

_digest_cache: dict[tuple[str, int, int], str] = {}
_digest_lock = threading.Lock()


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file, cached by (path, size, mtime) so engines can ask cheaply."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _digest_lock:
        cached = _digest_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _digest_lock:
        _digest_cache[key] = value
    return value


# -- ONNX inspection ---------------------------------------------------------------------


def onnx_signature(path: Path | str) -> OnnxSignature:
    """Check an ONNX file and read its graph inputs and outputs.

    Uses ``onnx`` (``onnx.checker``) when installed, otherwise ONNX Runtime, which the node
    always has: loading a session validates the graph too.

    Raises
    ------
    RepositoryError
        The file is missing or not a valid ONNX model.
    """
    path = Path(path)
    if not path.is_file():
        raise RepositoryError(f"no ONNX model at {path}")
    try:
        import onnx  # noqa: F401
    except ImportError:
        return _signature_onnxruntime(path)
    return _signature_onnx(path)


def _signature_onnx(path: Path) -> OnnxSignature:
    import onnx
    from onnx import helper

    try:
        # The path form handles models over 2 GB and external data next to the file.
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises ValidationError, DecodeError, OSError...
        raise RepositoryError(f"{path} is not a valid ONNX model: {exc}") from None

    def tensors(values: object, skip: set[str]) -> tuple[TensorSignature, ...]:
        out = []
        for value in values:  # type: ignore[attr-defined]
            if value.name in skip:
                continue
            ttype = value.type.tensor_type
            shape = tuple(
                int(d.dim_value) if d.HasField("dim_value") else -1 for d in ttype.shape.dim
            )
            try:
                dtype = str(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
            except Exception:  # noqa: BLE001 - unusual element type: report it by number
                dtype = f"onnx-type-{ttype.elem_type}"
            out.append(TensorSignature(value.name, shape, _canonical_dtype(dtype)))
        return tuple(out)

    initializers = {init.name for init in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return OnnxSignature(
        inputs=tensors(model.graph.input, initializers),
        outputs=tensors(model.graph.output, set()),
        opset=opset,
    )


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(bool)": "bool",
}


def _signature_onnxruntime(path: Path) -> OnnxSignature:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise RepositoryError(f"{path} is not a valid ONNX model: {exc}") from None
    return session_signature(session)


def session_signature(session: object) -> OnnxSignature:
    """The signature of a loaded ``onnxruntime.InferenceSession``."""

    def tensors(args: list) -> tuple[TensorSignature, ...]:  # type: ignore[type-arg]
        return tuple(
            TensorSignature(
                a.name,
                tuple(d if isinstance(d, int) and d > 0 else -1 for d in a.shape),
                _ORT_TYPES.get(a.type, a.type),
            )
            for a in args
        )

    return OnnxSignature(
        tensors(session.get_inputs()),  # type: ignore[attr-defined]
        tensors(session.get_outputs()),  # type: ignore[attr-defined]
    )


def _canonical_dtype(dtype: str) -> str:
    return "bool" if dtype == "bool_" else dtype


def compare_signature(card: ModelCard, signature: OnnxSignature) -> list[str]:
    """Where the card's inputs/outputs disagree with the ONNX graph (empty: they agree).

    Names and order must match (the torch backend passes inputs positionally), ranks and
    dtypes must match, a fixed card dimension must equal a fixed graph dimension, and a
    dimension the card declares dynamic (``-1``) must be dynamic in the graph. A graph
    dimension that is dynamic may be fixed in the card (the card is the narrower promise).
    """
    problems: list[str] = []
    for kind, specs, graph in (
        ("inputs", card.inputs, signature.inputs),
        ("outputs", card.outputs, signature.outputs),
    ):
        card_names = [s.name for s in specs]
        graph_names = [g.name for g in graph]
        if card_names != graph_names:
            if sorted(card_names) == sorted(graph_names):
                problems.append(f"{kind}: card order {card_names} differs from "
                                f"ONNX order {graph_names}")
            else:
                problems.append(f"{kind}: card names {card_names} but ONNX has {graph_names}")
            continue
        for spec, tensor in zip(specs, graph, strict=True):
            problems.extend(_compare_tensor(kind, spec, tensor))
    return problems


def _compare_tensor(kind: str, spec: TensorSpec, tensor: TensorSignature) -> list[str]:
    where = f"{kind} {spec.name!r}"
    problems = []
    if spec.dtype != tensor.dtype:
        problems.append(f"{where}: card dtype {spec.dtype} but ONNX dtype {tensor.dtype}")
    if len(spec.shape) != len(tensor.shape):
        problems.append(f"{where}: card shape {list(spec.shape)} has rank {len(spec.shape)} "
                        f"but ONNX shape {list(tensor.shape)} has rank {len(tensor.shape)}")
        return problems
    for axis, (want, have) in enumerate(zip(spec.shape, tensor.shape, strict=True)):
        if want == -1 and have != -1:
            problems.append(f"{where}: axis {axis} is dynamic (-1) in the card but fixed "
                            f"({have}) in the ONNX graph")
        elif want != -1 and have != -1 and want != have:
            problems.append(f"{where}: axis {axis} is {want} in the card but {have} in the "
                            "ONNX graph")
    return problems


def _external_data_files(path: Path) -> list[Path]:
    """Files an ONNX model keeps its weights in (``location`` of external tensors)."""
    try:
        import onnx
    except ImportError:
        return []
    model = onnx.load(str(path), load_external_data=False)
    files: set[Path] = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location":
                    files.add(path.parent / entry.value)
    return sorted(files)


# -- the repository ----------------------------------------------------------------------


class ModelRepository:
    """The models under one engines directory.

    Parameters
    ----------
    root
        The engines directory; ``None`` is the packaged one (see :func:`resolve_engines_dir`).
    """

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = resolve_engines_dir(root)

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    def folders(self) -> list[Path]:
        """Model folders: sub-folders holding a ``model.yaml``, sorted by name."""
        if not self.root.is_dir():
            return []
        return sorted(
            p for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith((".", "_")) and (p / CARD_FILE).is_file()
        )

    def names(self) -> list[str]:
        """Folder names of the models (a valid model's folder is named after its card)."""
        return [p.name for p in self.folders()]

    def __iter__(self) -> Iterator[ModelCard]:
        return iter(self.cards())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (self.root / name / CARD_FILE).is_file()

    def card(self, name: str) -> ModelCard:
        """Load and validate the card of model ``name``.

        Raises
        ------
        ModelNotFoundError
            No folder ``name`` with a card.
        ModelCardError
            The card is invalid (the message names the field).
        """
        folder = self.root / name
        if "/" in name or name.startswith(".") or not (folder / CARD_FILE).is_file():
            known = ", ".join(self.names()) or "none"
            raise ModelNotFoundError(f"no model {name!r} in {self.root}; known: {known}")
        card = ModelCard.load(folder)
        if card.name != folder.name:
            raise ModelCardError(f"model card {folder / CARD_FILE}: name {card.name!r} differs "
                                 f"from its folder name {folder.name!r}")
        return card

    def cards(self) -> list[ModelCard]:
        """Cards of every model whose card loads; invalid ones are logged and skipped."""
        cards = []
        for folder in self.folders():
            try:
                cards.append(self.card(folder.name))
            except ModelCardError as exc:
                log.warning("skipping model folder %s: %s", folder, exc)
        return cards

    def validate(self, name: str) -> ValidationReport:
        """Validate model ``name``: its card, its ONNX graph and their agreement."""
        folder = self.root / name
        try:
            card = self.card(name)
        except ModelCardError as exc:
            return ValidationReport(folder, None, (str(exc),))
        return ValidationReport(folder, card, tuple(check_model_files(card)))

    def validate_all(self) -> list[ValidationReport]:
        return [self.validate(folder.name) for folder in self.folders()]

    def import_model(
        self,
        onnx_path: Path | str,
        card_yaml: Path | str,
        *,
        state_dict: Path | str | None = None,
        replace: bool = False,
    ) -> ModelCard:
        """Validate ``card_yaml`` and ``onnx_path`` against each other and copy them in.

        The card file is copied as written (comments kept) to ``<root>/<name>/model.yaml``,
        the ONNX file (and any external-data files it names) to ``model.onnx``, and an
        optional torch ``state_dict`` to ``model.pt``. The copy is assembled in a temporary
        folder and renamed into place, so a failed import leaves nothing behind.

        Raises
        ------
        ModelImportError
            Bad card, ONNX that does not match it, or the name is taken and not ``replace``.
        """
        onnx_path, card_yaml = Path(onnx_path), Path(card_yaml)
        if not card_yaml.is_file():
            raise ModelImportError(f"no card file at {card_yaml}")
        try:
            data = yaml.safe_load(card_yaml.read_text(encoding="utf-8"))
            card = ModelCard.from_dict(data, card_yaml.parent)
        except yaml.YAMLError as exc:
            raise ModelImportError(f"card {card_yaml} is not valid YAML: {exc}") from None
        except ModelCardError as exc:
            raise ModelImportError(str(exc)) from None
        try:
            signature = onnx_signature(onnx_path)
        except RepositoryError as exc:
            raise ModelImportError(str(exc)) from None
        problems = compare_signature(card, signature)
        if problems:
            raise ModelImportError(f"{onnx_path} does not match card {card_yaml}: "
                                   + "; ".join(problems))
        if state_dict is not None and not Path(state_dict).is_file():
            raise ModelImportError(f"no state dict at {state_dict}")

        target = self.root / card.name
        if target.exists() and not replace:
            raise ModelImportError(f"model {card.name!r} already exists at {target}; "
                                   "pass replace to overwrite it")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".import-{card.name}-", dir=self.root))
        try:
            shutil.copyfile(card_yaml, staging / CARD_FILE)
            shutil.copyfile(onnx_path, staging / ONNX_FILE)
            for extra in _external_data_files(onnx_path):
                relative = extra.relative_to(onnx_path.parent)
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(extra, staging / relative)
            if state_dict is not None:
                shutil.copyfile(state_dict, staging / STATE_DICT_FILE)
            os.chmod(staging, 0o755)
            if target.exists():
                retired = Path(tempfile.mkdtemp(prefix=f".old-{card.name}-", dir=self.root))
                target.rename(retired / card.name)
                staging.rename(target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                staging.rename(target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        log.info("imported model %s version %s into %s", card.name, card.version, target)
        return self.card(card.name)


def check_model_files(card: ModelCard) -> list[str]:
    """Problems with a loaded card's files (empty list: the model is usable)."""
    problems: list[str] = []
    try:
        signature = onnx_signature(card.onnx_path)
    except RepositoryError as exc:
        return [str(exc)]
    problems.extend(compare_signature(card, signature))
    return problems


def import_model(
    onnx_path: Path | str,
    card_yaml: Path | str,
    engines_dir: Path | str | None = None,
    *,
    state_dict: Path | str | None = None,
    replace: bool = False,
) -> ModelCard:
    """Import a model into ``engines_dir`` (see :meth:`ModelRepository.import_model`)."""
    return ModelRepository(engines_dir).import_model(
        onnx_path, card_yaml, state_dict=state_dict, replace=replace
    )
