"""Property-based fuzzing of the code that sees peer-controlled values first.

Header parsing runs on mutated bytes of real DICOM files; routing on arbitrary header
values and rules; UID validation on arbitrary text. The properties: only the documented
exception type comes out, and nothing a peer sends can make a path leave the spool.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import struct
import tempfile
import zlib
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from spine_node.inference.errors import PipelineError
from spine_node.inference.pixels import check_pixel_data, pixel_budget
from spine_node.node.config import Route, RouteMatch
from spine_node.node.deflated import DeflateMalformed, inspect_deflated
from spine_node.node.errors import InvalidUIDError
from spine_node.node.receive import HeaderWalk, PastHead, StoreRejected, check_structure, inspect_dataset, read_header
from spine_node.node.route import SeriesFacts, matches, plan
from spine_node.node.spool import Spool
from spine_node.node.uids import is_valid_uid, validate_uid
from tests.dicom_factory import real_ct

# Fixtures here are module-scoped and read-only, so reusing them across examples is fine.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _as_file_format(name: str) -> tuple[bytes, str]:
    path = get_testdata_file(name)
    assert path is not None
    ds = dcmread(path)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), str(ds.file_meta.TransferSyntaxUID)


@pytest.fixture(scope="module")
def seeds() -> list[tuple[bytes, str]]:
    """Real files in the encodings the node accepts: explicit, implicit, encapsulated, deflated."""
    files = [_as_file_format(name) for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm",
                                                 "SC_rgb_jpeg_dcmtk.dcm", "image_dfl.dcm")]
    syntaxes = {syntax for _data, syntax in files}
    assert {ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit,
            DeflatedExplicitVRLittleEndian} <= syntaxes
    return files


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        yield Path(folder)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("length"), st.integers(0, 1 << 20),
              st.sampled_from([0xFFFFFFFF, 0x7FFFFFF0, 0xFFFFFFFE, 0, 1, 0x10000])),
)


def _mutate(data: bytes, ops: list[tuple[str, int, object]]) -> bytes:
    buffer = bytearray(data)
    for kind, where, arg in ops:
        if not buffer:
            break
        at = where % len(buffer)
        if kind == "flip":
            buffer[at] = int(arg)  # type: ignore[call-overload]
        elif kind == "truncate":
            del buffer[at:]
        elif kind == "insert":
            buffer[at:at] = arg  # type: ignore[assignment]
        else:
            buffer[at:at + 4] = struct.pack("<L", int(arg))  # type: ignore[call-overload]
    return bytes(buffer)


@FUZZ
@given(seed=st.integers(0, 4), ops=st.lists(mutation, min_size=1, max_size=6),
       syntax_from_seed=st.booleans())
def test_header_parsing_of_mutated_files(seeds: list[tuple[bytes, str]], scratch: Path, seed: int,
                                         ops: list[tuple[str, int, object]], syntax_from_seed: bool) -> None:
    data, syntax = seeds[seed]
    path = scratch / "mutant.dcm"
    path.write_bytes(_mutate(data, ops))
    spool = Spool(scratch / "spool")
    try:
        check_structure(path, syntax if syntax_from_seed else ImplicitVRLittleEndian)
    except StoreRejected as exc:
        assert exc.status == 0xC210
    try:
        info = read_header(path)
    except StoreRejected as exc:
        assert exc.status in (0xC210, 0xC220)
        return
    for uid in (info.study_uid, info.series_uid, info.sop_instance_uid, info.sop_class_uid):
        assert is_valid_uid(uid)
    target = spool.instance_path(info.study_uid, info.series_uid, info.sop_instance_uid)
    assert target.resolve().is_relative_to(spool.root.resolve())
    assert len(target.relative_to(spool.root).parts) == 3


def _slow_path(path: Path, syntax: str) -> tuple[bool | None, object] | int:
    """check_structure + read_header (pydicom), or the status they refuse with."""
    try:
        return check_structure(path, syntax), read_header(path)
    except StoreRejected as exc:
        return exc.status


@FUZZ
@given(seed=st.integers(0, 4), ops=st.lists(mutation, min_size=0, max_size=4))
def test_one_walk_header_agrees_with_pydicom(seeds: list[tuple[bytes, str]], scratch: Path, seed: int,
                                             ops: list[tuple[str, int, object]]) -> None:
    """The receive hot path (inspect_dataset, one walk, no pydicom) against the slow path.

    The data set is mutated, the file meta (which the node writes itself) is not.
    """
    data, syntax = seeds[seed]
    start = 144 + struct.unpack_from("<L", data, 140)[0]
    mutant = data[:start] + _mutate(data[start:], ops) if ops else data
    path = scratch / "mutant.dcm"
    path.write_bytes(mutant)
    try:
        fast = inspect_dataset(mutant, start, syntax)
    except StoreRejected as exc:
        assert exc.status in (0xC210, 0xC220)
        if not ops:
            raise
        return
    if fast is None:  # deflated: only the slow path judges it
        assert syntax == DeflatedExplicitVRLittleEndian
        return
    slow = _slow_path(path, syntax)
    if not ops:
        assert slow == fast
    elif not isinstance(slow, int):
        # Where both accept, they read the same instance; where pydicom alone refuses, the
        # walk accepted a structurally sound data set with valid UIDs (a pipeline judges it).
        assert slow[1] == fast[1] and slow[0] == fast[0]


def _judge(data: bytes, start: int, syntax: str, size: int | None = None) -> object:
    try:
        return inspect_dataset(data, start, syntax, size=size)
    except StoreRejected as exc:
        return exc.status


@FUZZ
@given(seed=st.integers(0, 4), ops=st.lists(mutation, min_size=0, max_size=4), cut=st.integers(0, 4096))
def test_walk_over_the_beginning_agrees_with_the_whole_file(seeds: list[tuple[bytes, str]], seed: int,
                                                          ops: list[tuple[str, int, object]], cut: int) -> None:
    """Receive keeps only a file's beginning in memory: walking that (with the file's size)
    gives the whole file's answer, or says it needs more; never another answer."""
    data, syntax = seeds[seed]
    start = 144 + struct.unpack_from("<L", data, 140)[0]
    mutant = data[:start] + _mutate(data[start:], ops) if ops else data
    head = mutant[:start + cut]
    whole = _judge(mutant, start, syntax)
    try:
        assert _judge(head, start, syntax, size=len(mutant)) == whole
    except PastHead:
        pass
    # Receive begins the walk over the head while the rest arrives, then finishes it.
    walk = HeaderWalk(start, syntax)
    walk.begin(head)
    try:
        finished: object = walk.finish(head, len(mutant), lambda: contextlib.nullcontext(mutant))
    except StoreRejected as exc:
        finished = exc.status
    assert finished == whole
    # Begun over the head, finished over the whole file: the walk goes on where it stopped.
    walk = HeaderWalk(start, syntax)
    walk.begin(head)
    assert _finish(walk, mutant) == whole


def _finish(walk: HeaderWalk, data: bytes) -> object:
    try:
        return walk.finish(data, len(data))
    except StoreRejected as exc:
        return exc.status


def test_walk_over_the_beginning_of_a_ct_slice_needs_no_more(scratch: Path) -> None:
    """A 512x512 CT slice's header and pixel data header sit in its first 64 KiB."""
    ds = real_ct()
    ds.Rows = ds.Columns = 512
    ds.PixelData = bytes(512 * 512 * 2)
    path = scratch / "ct512.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    start = 144 + struct.unpack_from("<L", data, 140)[0]
    syntax = str(ds.file_meta.TransferSyntaxUID)
    whole = _judge(data, start, syntax)
    assert isinstance(whole, tuple) and whole[0] is True
    assert _judge(data[:64 << 10], start, syntax, size=len(data)) == whole
    with pytest.raises(PastHead):  # the pixel data element's header is not in the first 8 bytes
        _judge(data[:start + 8], start, syntax, size=len(data))


@FUZZ
@given(value=st.one_of(st.text(max_size=80), st.from_regex(r"[0-9./\\]{0,70}", fullmatch=True),
                       st.none(), st.integers(), st.binary(max_size=20)))
def test_validate_uid_accepts_only_path_safe_uids(value: object) -> None:
    try:
        uid = validate_uid(value, "UID")
    except InvalidUIDError as exc:
        # The message may show a bad value only when it is digits and dots.
        assert not isinstance(value, str) or value == "" or repr(value) not in str(exc) or \
            set(value) <= set("0123456789.")
        return
    assert uid == value and is_valid_uid(uid)
    assert set(uid) <= set("0123456789.") and uid not in (".", "..") and ".." not in uid
    root = Path("/spool-root")
    assert os.path.normpath(root / uid / uid / f"{uid}.dcm").startswith("/spool-root/")


header_text = st.text(alphabet=st.characters(codec="latin-1"), max_size=24)
pattern = st.one_of(st.text(alphabet="*?[]!^-\\AB CDLPRSTX01", max_size=8), header_text)
uid_text = st.from_regex(r"1\.2\.(0|[1-9][0-9]{0,5})(\.(0|[1-9][0-9]{0,5})){0,4}", fullmatch=True)
facts = st.builds(SeriesFacts, study_uid=uid_text, series_uid=uid_text, modality=header_text,
                  body_part=header_text, view_position=header_text,
                  sop_class_uid=st.one_of(uid_text, header_text))
route_match = st.builds(RouteMatch, modality=st.lists(pattern, max_size=3),
                        body_part=st.lists(pattern, max_size=3),
                        view_position=st.lists(pattern, max_size=3),
                        sop_class_uid=st.lists(uid_text, max_size=2))
route = st.builds(Route, name=st.text(min_size=1, max_size=12), match=route_match,
                  pipelines=st.lists(st.from_regex(r"[a-z0-9][a-z0-9_-]{0,10}", fullmatch=True),
                                     min_size=1, max_size=3),
                  scope=st.sampled_from(["series", "study"]), queue=st.sampled_from(["cpu", "gpu"]))


@FUZZ
@given(routes=st.lists(route, max_size=4), completed=st.lists(facts, max_size=4),
       others=st.lists(facts, max_size=3))
def test_routing_of_arbitrary_headers_and_rules(routes: list[Route], completed: list[SeriesFacts],
                                                others: list[SeriesFacts]) -> None:
    study = completed + others
    jobs = plan(routes, completed, study)
    known = {f.series_uid for f in study}
    pipelines = {p for r in routes for p in r.pipelines}
    keys = [(job.key_series_uid, job.pipeline) for job in jobs]
    assert len(keys) == len(set(keys)), "a (series, pipeline) job is planned twice"
    for job in jobs:
        assert job.pipeline in pipelines and set(job.series_uids) <= known and job.series_uids
    for item in completed:
        for rule in routes:
            assert isinstance(matches(rule.match, item), bool)
    # An empty rule matches everything; a rule with a criterion never matches a series
    # whose value satisfies none of its patterns.
    for item in completed:
        assert matches(RouteMatch(), item)


def test_structure_check_passes_every_readable_real_file(scratch: Path) -> None:
    """No false alarms: pydicom's and pydicom-data's files all pass, pixel data found right."""
    import warnings

    from pydicom.uid import UID

    from tests.dicom_factory import local_test_files

    checked = 0
    for name in local_test_files():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(name)
                syntax = UID(ds.file_meta.TransferSyntaxUID)
                if not syntax.is_little_endian or os.path.getsize(name) > 20 << 20:
                    continue
                out = scratch / "real.dcm"
                ds.save_as(out, enforce_file_format=True)
        except Exception:  # noqa: BLE001 - pydicom's deliberately broken samples
            continue
        has_pixels = check_structure(out, syntax)  # deflated too: walked while inflating
        assert has_pixels == any(t in ds for t in (0x7FE00010, 0x7FE00008, 0x7FE00009)), name
        checked += 1
    assert checked > 50


# -- deflated data sets and compressed pixel data ---------------------------------------------------
# Deflated data sets are walked while inflating (node/deflated.py), never inflated whole;
# that walk must give the plain walk's verdict on the same data set. Compressed pixel data
# is checked before decoding (inference/pixels.py): only PipelineError may come out.

def _deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def _deflated_verdict(file_start: bytes, deflated: bytes) -> object:
    """Verdict of the receive check on a deflated file: (has pixels, info) or a status."""
    data = file_start + deflated
    try:
        return inspect_deflated(lambda offset, count: data[offset:offset + count], len(file_start), len(data))
    except StoreRejected as exc:
        return exc.status
    except DeflateMalformed:
        return 0xC210


def _plain_verdict(data: bytes, start: int) -> object:
    try:
        return inspect_dataset(data, start, ExplicitVRLittleEndian)
    except StoreRejected as exc:
        return exc.status


@pytest.fixture(scope="module")
def plain_seeds(seeds: list[tuple[bytes, str]]) -> list[tuple[bytes, int]]:
    """Explicit VR little endian files (those a deflated data set inflates to): (file, data set start)."""
    out = []
    for data, syntax in seeds:
        if syntax == ExplicitVRLittleEndian:
            out.append((data, 144 + struct.unpack_from("<L", data, 140)[0]))
    ds = dcmread(BytesIO(seeds[4][0]))  # the deflated sample, re-encoded explicit
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    out.append((data, 144 + struct.unpack_from("<L", data, 140)[0]))
    return out


@pytest.fixture(scope="module")
def compressed_seeds() -> list[Dataset]:
    """Real pixel data in the compressed syntaxes whose headers pixels.py reads."""
    out = []
    for syntax in (JPEG2000Lossless, JPEGLSLossless, RLELossless):
        ds = real_ct()
        ds.compress(syntax)
        out.append(ds)
    path = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    assert path is not None
    out.append(dcmread(path))
    return out


def _deflated_case(rng: random.Random, plain_seeds: list[tuple[bytes, int]]) -> str:
    """One mutated data set, deflated: the bounded walk agrees with the plain walk."""
    data, start = rng.choice(plain_seeds)
    ops = _random_ops(rng, len(data) - start)
    plain = data[:start] + _mutate(data[start:], ops)
    deflated = _deflate(plain[start:])
    if rng.random() < 0.3:  # the compressed bytes themselves broken: any verdict, no other error
        broken = _mutate(deflated, _random_ops(rng, len(deflated)))
        verdict = _deflated_verdict(plain[:start], broken)
        assert verdict in (0xC210, 0xC220, 0xA900) or isinstance(verdict, tuple), verdict
        return "deflate-broken"
    assert _deflated_verdict(plain[:start], deflated) == _plain_verdict(plain, start), ops
    return "deflate"


def _pixel_case(rng: random.Random, compressed_seeds: list[Dataset]) -> str:
    """Mutated encapsulated pixel data and pixel attributes: checked, or PipelineError."""
    ds = copy.deepcopy(rng.choice(compressed_seeds))  # setting a value changes the shared element
    if rng.random() < 0.5:
        value = ds.PixelData
        ds.PixelData = _mutate(value, _random_ops(rng, len(value)))
    if rng.random() < 0.5:
        keyword = rng.choice(["Rows", "Columns", "NumberOfFrames", "BitsAllocated", "SamplesPerPixel"])
        setattr(ds, keyword, rng.choice([0, 1, 3, 8, 12, 16, 128, 4096, 16384, 65535]))
    try:
        with pixel_budget(1 << 29):
            check_pixel_data([ds], "fuzz")
    except PipelineError:
        return "pixels-refused"
    return "pixels-passed"


def _header_case(rng: random.Random, seeds: list[tuple[bytes, str]], spool: Spool) -> str:
    """A mutated file through the one-walk receive check; an accepted one maps inside the spool."""
    data, syntax = rng.choice(seeds[:4])
    start = 144 + struct.unpack_from("<L", data, 140)[0]
    mutant = data[:start] + _mutate(data[start:], _random_ops(rng, len(data) - start))
    try:
        verdict = inspect_dataset(mutant, start, syntax)
    except StoreRejected as exc:
        assert exc.status in (0xC210, 0xC220)
        return "header-refused"
    assert verdict is not None
    info = verdict[1]
    target = spool.instance_path(info.study_uid, info.series_uid, info.sop_instance_uid)
    assert target.resolve().is_relative_to(spool.root.resolve())
    return "header-accepted"


def _random_ops(rng: random.Random, size: int) -> list[tuple[str, int, object]]:
    ops: list[tuple[str, int, object]] = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["flip", "flip", "truncate", "insert", "length"])
        where = rng.randrange(max(size, 1))
        if kind == "flip":
            ops.append((kind, where, rng.randrange(256)))
        elif kind == "truncate":
            ops.append((kind, where, 0))
        elif kind == "insert":
            ops.append((kind, where, bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))))
        else:
            ops.append((kind, where, rng.choice([0xFFFFFFFF, 0x7FFFFFF0, 0xFFFFFFFE, 0, 1, 0x10000])))
    return ops


def test_fuzz_corpus(seeds: list[tuple[bytes, str]], plain_seeds: list[tuple[bytes, int]],
                     compressed_seeds: list[Dataset], scratch: Path) -> None:
    """FUZZ_CASES (default 10,000) seeded random cases over the header walk, the deflated walk
    and the pixel checks: no exception but the documented ones. ``FUZZ_SEED`` repeats a run."""
    cases = int(os.environ.get("FUZZ_CASES", "10000"))
    seed = int(os.environ.get("FUZZ_SEED", str(random.randrange(1 << 32))))
    rng = random.Random(seed)
    spool = Spool(scratch / "corpus-spool")
    outcomes: dict[str, int] = {}
    for index in range(cases):
        kind = rng.random()
        try:
            if kind < 0.4:
                outcome = _header_case(rng, seeds, spool)
            elif kind < 0.75:
                outcome = _deflated_case(rng, plain_seeds)
            else:
                outcome = _pixel_case(rng, compressed_seeds)
        except AssertionError as exc:
            raise AssertionError(f"case {index} of FUZZ_SEED={seed}: {exc}") from None
        except Exception as exc:
            raise AssertionError(f"case {index} of FUZZ_SEED={seed}: unexpected {type(exc).__name__}: {exc}") from exc
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    print(f"\nfuzz corpus FUZZ_SEED={seed}: {outcomes}")
    assert sum(outcomes.values()) == cases
    # Every path was taken, both ways where there are two.
    assert {"header-refused", "header-accepted", "deflate", "pixels-refused", "pixels-passed"} <= set(outcomes)
    assert not any(spool.root.rglob("*.dcm"))


def test_live_receive_of_mutated_data_sets(plain_seeds: list[tuple[bytes, int]], tmp_path: Path) -> None:
    """FUZZ_LIVE_CASES (default 300) mutated data sets sent to a live receiver in this process,
    plain, deflated and JPEG 2000: every one answered with a documented status on an
    association that stays up, nothing left in .incoming, nothing outside the spool."""
    from spine_node.node.audit import Database
    from spine_node.node.config import load_settings
    from spine_node.node.db_migrate import upgrade
    from spine_node.node.receive import Receiver
    from tests.scu import CT_IMAGE_STORAGE, raw_associate, raw_store, release

    cases = int(os.environ.get("FUZZ_LIVE_CASES", "300"))
    seed = int(os.environ.get("FUZZ_SEED", str(random.randrange(1 << 32))))
    rng = random.Random(seed)
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    settings = load_settings(dicom={"host": "127.0.0.1", "port": 0},
                             storage={"data_dir": tmp_path / "node", "min_free_mb": 0}, database_url=url)
    receiver = Receiver(settings, Database(url))
    receiver.start()
    j2k = real_ct()
    j2k.compress(JPEG2000Lossless)
    buffer = BytesIO()
    j2k.save_as(buffer, enforce_file_format=True)
    j2k_file = buffer.getvalue()
    j2k_seed = (j2k_file, 144 + struct.unpack_from("<L", j2k_file, 140)[0])
    ct_seeds = [seed_ for seed_ in plain_seeds if b"1.2.840.10008.5.1.4.1.1.2\0" in seed_[0][:400]]
    statuses: dict[int, int] = {}
    try:
        for syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEG2000Lossless):
            sock = raw_associate(receiver.port, CT_IMAGE_STORAGE, syntax)
            try:
                for message_id in range(1, cases // 3 + 1):
                    data, start = j2k_seed if syntax == JPEG2000Lossless else rng.choice(ct_seeds)
                    dataset = _mutate(data[start:], _random_ops(rng, len(data) - start))
                    if syntax == DeflatedExplicitVRLittleEndian:
                        dataset = _deflate(dataset)
                    # The seed's own SOP Instance UID: intact, the instance is stored.
                    sop = str(dcmread(BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
                    status = raw_store(sock, CT_IMAGE_STORAGE, sop, dataset, message_id=message_id)
                    assert status in (0x0000, 0xA900, 0xC210, 0xC220, 0xC221), \
                        f"FUZZ_SEED={seed}: status 0x{status:04X}"
                    statuses[status] = statuses.get(status, 0) + 1
            finally:
                release(sock)
    finally:
        receiver.stop()
    print(f"\nlive fuzz FUZZ_SEED={seed}: {({f'0x{k:04X}': v for k, v in statuses.items()})}")
    root = receiver.spool.root
    assert not any((root / ".incoming").iterdir())
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.is_file() and relative.parts[0] not in (".incoming", ".trash"):
            study, series, name = relative.parts
            assert is_valid_uid(study) and is_valid_uid(series) and is_valid_uid(name[:-4])
    for path in tmp_path.rglob("*"):  # nothing but the node's own folders and database
        assert path.resolve().is_relative_to(tmp_path.resolve())
        assert path.relative_to(tmp_path).parts[0] in ("node", "node.db", "node.db-journal", "node.db-wal",
                                                       "node.db-shm"), path
