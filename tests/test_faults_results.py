"""User-reported faults in saved results, the download cache and the shipped weights.

1. A result names only plain files inside its directory, and dissect.json is covered by a hash too.
2. A failed save (a full disk, at any step) leaves the earlier result loading bit for bit.
3. Every file in the download cache is checked against a recorded SHA-256 before use.
4. The shipped-weights loader reads weights only.
"""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import torch

from gandissect_widgets.checkpoint import CheckpointError
from gandissect_widgets.download import HASH_SUFFIX, DownloadError, cached_file
from gandissect_widgets.engine import results
from gandissect_widgets.engine.io import atomic_write_bytes, json_bytes
from gandissect_widgets.engine.results import (Dissection, LegacyResultWarning, ResultError, ResultSaveError,
                                               document_hash)

from test_download import _Server


# -- helpers ----------------------------------------------------------------------------------------

def make(units=6, concepts=4, seed=0, k=3, compressible=False):
    """A small Dissection built directly (no model run); ``compressible``: arrays that zip to almost nothing."""
    rng = np.random.default_rng(seed)
    fill = (lambda shape: np.zeros(shape)) if compressible else (lambda shape: rng.random(shape))
    iou = fill((units, concepts))
    iou[:, 0] = 0
    layer = dict(iou=iou, intersection=(fill((units, concepts)) * 100).astype(np.int64),
                 mask_pixels=np.full(units, 50, np.int64), concept_pixels=np.full(concepts, 70, np.int64),
                 n_pixels=np.int64(1000), thresholds=fill(units).astype(np.float32),
                 fraction_above=np.full(units, 0.01), topk_indices=np.tile(np.arange(k), (units, 1)),
                 topk_values=fill((units, k)).astype(np.float32), mean=fill(units), std=fill(units),
                 min=fill(units), max=fill(units), shape=np.array([units, 4, 4], np.int64))
    labels = ["-"] + [f"concept{i}" for i in range(1, concepts)]
    return Dissection(labels, {"layer1": layer}, {"generator": "g", "segmenter": "s", "seed": seed})


def same(d1, d2):
    assert d1.labels == d2.labels and d1.layers == d2.layers and d1.settings == d2.settings
    for l in d1.layers:
        for name in results._ARRAYS:
            np.testing.assert_array_equal(d1.array(l, name), d2.array(l, name), err_msg=name)


def snapshot(d):
    """{name: bytes} of everything in ``d`` (hidden files too): to compare a directory bit for bit."""
    out = {}
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        out[name] = open(p, "rb").read() if os.path.isfile(p) else "<dir>"
    return out


def doc_of(d):
    return json.load(open(os.path.join(d, "dissect.json")))


def write_doc(d, doc, seal=True):
    """Write ``doc`` as dissect.json, with a correct document hash when ``seal`` (a consistent edit)."""
    if seal:
        doc = dict(doc, document_sha256=document_hash(doc))
    atomic_write_bytes(os.path.join(d, "dissect.json"), json_bytes(doc))


def one_line(e):
    msg = str(e)
    assert "\n" not in msg and msg, msg
    return msg


def save_v1(d, D):
    """The layout the previous version wrote: arrays.npz + dissect.json (version 1, no document hash)."""
    os.makedirs(d, exist_ok=True)
    arrays = {f"{l}/{k}": D.array(l, k) for l in D.layers for k in results._ARRAYS}
    np.savez_compressed(os.path.join(d, "arrays.npz"), **arrays)
    doc = D.summary()
    doc["version"] = 1
    doc["arrays"] = {"file": "arrays.npz", "sha256": hashlib.sha256(open(os.path.join(d, "arrays.npz"), "rb")
                                                                    .read()).hexdigest(), "layers": D.layers}
    with open(os.path.join(d, "dissect.json"), "w") as f:
        json.dump(doc, f, indent=1)


@pytest.fixture
def saved(tmp_path):
    """A result in tmp_path/res, its Dissection, and a pristine copy at tmp_path/copy."""
    D = make()
    d = str(tmp_path / "res")
    D.save(d)
    shutil.copytree(d, tmp_path / "copy")
    return d, D, str(tmp_path / "copy")


# -- 1. files inside the directory; one manifest covers everything ------------------------------------

def test_save_layout_names_hashed_arrays_file(saved):
    d, D, _ = saved
    doc = doc_of(d)
    name = doc["arrays"]["file"]
    assert name.startswith("arrays-") and name.endswith(".npz") and sorted(os.listdir(d)) == sorted(["dissect.json", name])
    assert set(doc["arrays"]) == {"file", "sha256", "layers"} and doc["version"] == results.VERSION
    assert doc["document_sha256"] == document_hash(doc)
    same(D, Dissection.load(d))


@pytest.mark.parametrize("seal", [True, False], ids=["v2-sealed", "v1-unsealed"])
@pytest.mark.parametrize("bad", ["../outside.npz", "ABS", "sub/arrays.npz", "..", ".", "", "sub\\arrays.npz",
                                 "arrays.npz\0x", None, 7])
def test_arrays_file_outside_directory_is_refused(saved, tmp_path, bad, seal):
    d, D, copy = saved
    doc = doc_of(d)
    real = os.path.join(d, doc["arrays"]["file"])
    outside = tmp_path / "outside.npz"
    shutil.copy(real, outside)  # an outside file with the recorded hash: only the name check refuses it
    (tmp_path / "res" / "sub").mkdir()
    shutil.copy(real, tmp_path / "res" / "sub" / "arrays.npz")
    bad = str(outside) if bad == "ABS" else bad
    doc["arrays"]["file"] = bad
    if not seal:
        doc["version"] = 1
        doc.pop("document_sha256")
    write_doc(d, doc, seal=seal)
    before = snapshot(d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyResultWarning)
        with pytest.raises(ResultError) as e:
            Dissection.load(d)
    msg = one_line(e.value)
    assert "not a plain file name inside" in msg and repr(bad) in msg and "arrays-<hash>.npz" in msg, msg
    assert snapshot(d) == before  # loading writes nothing
    same(D, Dissection.load(copy))  # the earlier result still loads


def test_symlink_leading_outside_is_refused(saved, tmp_path):
    d, D, copy = saved
    name = doc_of(d)["arrays"]["file"]
    outside = tmp_path / "elsewhere" / name
    outside.parent.mkdir()
    os.replace(os.path.join(d, name), outside)
    os.symlink(outside, os.path.join(d, name))  # same bytes, same hash: only the place is wrong
    with pytest.raises(ResultError) as e:
        Dissection.load(d)
    msg = one_line(e.value)
    assert f"{os.path.join(d, name)} is a symlink to {outside}, outside {d}" in msg and "plain files inside" in msg
    # dissect.json itself as a symlink out of the directory
    os.unlink(os.path.join(d, name))
    os.replace(outside, os.path.join(d, name))
    os.replace(os.path.join(d, "dissect.json"), tmp_path / "elsewhere" / "dissect.json")
    os.symlink(tmp_path / "elsewhere" / "dissect.json", os.path.join(d, "dissect.json"))
    with pytest.raises(ResultError, match="is a symlink to .* outside"):
        Dissection.load(d)
    same(D, Dissection.load(copy))


def test_symlink_inside_directory_and_fifo(saved):
    d, D, _ = saved
    name = doc_of(d)["arrays"]["file"]
    os.replace(os.path.join(d, name), os.path.join(d, "real.npz"))
    os.symlink("real.npz", os.path.join(d, name))  # a link to a sibling stays inside: fine
    same(D, Dissection.load(d))
    os.unlink(os.path.join(d, name))
    os.mkfifo(os.path.join(d, name))  # reading it would hang
    with pytest.raises(ResultError, match="is not a regular file"):
        Dissection.load(d)


@pytest.mark.parametrize("edit", ["label", "unit_label", "iou", "settings", "arrays_sha", "reformat_only"])
def test_edited_dissect_json_is_refused(saved, edit):
    d, D, copy = saved
    doc = doc_of(d)
    if edit == "label":
        doc["labels"][1] = "tree"
    elif edit == "unit_label":
        doc["layers"][0]["units"][0]["label"] = "tree"
    elif edit == "iou":
        doc["layers"][0]["units"][0]["iou"] = 0.99
    elif edit == "settings":
        doc["settings"]["seed"] = 5
    elif edit == "arrays_sha":
        doc["arrays"]["sha256"] = "0" * 64
    with open(os.path.join(d, "dissect.json"), "w") as f:  # an editor: valid JSON, any layout
        json.dump(doc, f, indent=4, sort_keys=True)
    if edit == "reformat_only":  # the content hash is of the content, not of the spacing
        same(D, Dissection.load(d))
        return
    with pytest.raises(ResultError) as e:
        Dissection.load(d)
    msg = one_line(e.value)
    assert msg.startswith(f"{os.path.join(d, 'dissect.json')} is corrupt or was edited"), msg
    assert doc["document_sha256"] in msg and "recompute it (delete " in msg, msg
    same(D, Dissection.load(copy))


@pytest.mark.parametrize("how", ["append", "flip", "swap_other_result"])
def test_tampered_arrays_file_is_refused(saved, tmp_path, how):
    d, D, copy = saved
    name = doc_of(d)["arrays"]["file"]
    path = os.path.join(d, name)
    data = bytearray(open(path, "rb").read())
    if how == "append":
        data += b"x"
    elif how == "flip":
        data[len(data) // 2] ^= 1
    else:
        other = str(tmp_path / "other")
        make(seed=9).save(other)
        data = open(os.path.join(other, doc_of(other)["arrays"]["file"]), "rb").read()
    open(path, "wb").write(bytes(data))
    with pytest.raises(ResultError) as e:
        Dissection.load(d)
    msg = one_line(e.value)
    assert msg.startswith(f"{path} is corrupt or was edited: its SHA-256 {hashlib.sha256(data).hexdigest()}")
    assert doc_of(d)["arrays"]["sha256"] in msg and "recompute it" in msg
    same(D, Dissection.load(copy))


def test_missing_or_garbled_files(saved):
    d, D, copy = saved
    name = doc_of(d)["arrays"]["file"]
    os.unlink(os.path.join(d, name))
    with pytest.raises(ResultError, match=r"is missing: the result is incomplete; recompute it") as e:
        Dissection.load(d)
    one_line(e.value)
    open(os.path.join(d, "dissect.json"), "wb").write(b'{"format": "gandissect-widgets/diss')
    with pytest.raises(ResultError, match=r"dissect.json is corrupt \(not valid JSON") as e:
        Dissection.load(d)
    one_line(e.value)
    open(os.path.join(d, "dissect.json"), "wb").write(b"\xff\xfe")
    with pytest.raises(ResultError, match="not valid JSON"):
        Dissection.load(d)
    with pytest.raises(FileNotFoundError, match="no dissect.json"):
        Dissection.load(os.path.join(d, "nothing"))
    same(D, Dissection.load(copy))


def test_future_version_refused(saved):
    d, _, _ = saved
    doc = doc_of(d)
    doc["version"] = results.VERSION + 1
    write_doc(d, doc)
    with pytest.raises(ResultError, match=rf"format version {results.VERSION + 1}; this package reads versions 1 to "
                                          rf"{results.VERSION}"):
        Dissection.load(d)


def test_previous_version_results_load_with_a_warning(tmp_path):
    D = make(seed=3)
    d = str(tmp_path / "old")
    save_v1(d, D)
    with pytest.warns(LegacyResultWarning, match="saved by an older version .* save it again to add one"):
        same(D, Dissection.load(d))
    with open(os.path.join(d, "arrays.npz"), "ab") as f:  # its arrays are still checked
        f.write(b"x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyResultWarning)
        with pytest.raises(ResultError, match="arrays.npz is corrupt or was edited"):
            Dissection.load(d)
    save_v1(d, D)
    E = make(seed=4)
    E.save(d)  # saving over an old-layout result switches it to the new one and removes arrays.npz
    assert sorted(os.listdir(d)) == sorted(["dissect.json", doc_of(d)["arrays"]["file"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same(E, Dissection.load(d))


def test_save_over_a_result_switches_and_cleans_up(saved):
    d, D, _ = saved
    first = doc_of(d)["arrays"]["file"]
    E = make(seed=1)
    E.save(d)
    second = doc_of(d)["arrays"]["file"]
    assert second != first and sorted(os.listdir(d)) == sorted(["dissect.json", second])
    same(E, Dissection.load(d))
    E.save(d)  # saving the same result again keeps one arrays file
    assert len(os.listdir(d)) == 2
    same(E, Dissection.load(d))


def test_save_never_removes_files_a_tampered_manifest_names(saved):
    """The old arrays file is removed after the switch only if its name is one a save writes."""
    d, _, _ = saved
    doc = doc_of(d)
    keep = os.path.join(d, "notes.txt")
    open(keep, "w").write("mine")
    doc["arrays"]["file"] = "notes.txt"
    write_doc(d, doc)
    make(seed=2).save(d)
    assert open(keep).read() == "mine"


# -- 2. a failed save leaves the earlier result ------------------------------------------------------

class _Faults:
    """Counts os-level calls a save makes (open, write, fsync, close, replace, chmod, mkdir) and fails the
    ``fail_at``-th with ENOSPC, as a full disk does (close fails after closing, as on Linux)."""

    NAMES = ("open", "write", "fsync", "close", "replace", "chmod", "mkdir")

    def __init__(self, monkeypatch, fail_at=None):
        self.calls, self.fail_at, self.failed = [], fail_at, None
        for name in self.NAMES:
            monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))

    def _wrap(self, name, real):
        def call(*args, **kw):
            self.calls.append(name)
            if len(self.calls) - 1 == self.fail_at:
                self.failed = name
                if name == "close":
                    real(*args, **kw)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kw)
        return call


def _count_calls(tmp_path, monkeypatch):
    d = str(tmp_path / "count")
    make().save(d)
    with monkeypatch.context() as m:
        faults = _Faults(m)
        make(seed=1).save(d)
    return list(faults.calls)


def test_failed_save_at_each_step_keeps_the_earlier_result(tmp_path, monkeypatch):
    old, new = make(seed=0), make(seed=1)
    steps = _count_calls(tmp_path, monkeypatch)
    assert {"write", "fsync", "replace"} <= set(steps) and len(steps) >= 8, steps
    failures = 0
    for k, op in enumerate(steps):
        d = str(tmp_path / f"res{k}")
        old.save(d)
        before = snapshot(d)
        with monkeypatch.context() as m:
            faults = _Faults(m, fail_at=k)
            try:
                new.save(d)
                raised = None
            except ResultSaveError as e:
                raised = e
        assert faults.failed == op, (k, faults.failed, op)
        if raised is None:  # a failure the save may ignore: mkdir of the existing directory, or the
            assert op in ("mkdir", "open", "fsync", "close"), (k, op)  # directory's fsync after the switch
            same(new, Dissection.load(d))
            assert sorted(os.listdir(d)) == sorted(["dissect.json", doc_of(d)["arrays"]["file"]])
            continue
        failures += 1
        msg = one_line(raised)
        assert raised.errno == errno.ENOSPC and isinstance(raised, OSError)
        assert msg.startswith(f"could not save the dissection in {d}: no space left on device"), msg
        assert "the result that was there is unchanged" in msg and "free some space" in msg, msg
        assert snapshot(d) == before, (k, op, sorted(snapshot(d)))  # bit for bit, no temporary files
        same(old, Dissection.load(d))
    assert failures >= 6, failures


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    new = make(seed=1)
    with monkeypatch.context() as m:
        faults = _Faults(m)
        new.save(str(tmp_path / "count"))
    steps, failures = list(faults.calls), 0
    for k, op in enumerate(steps):
        d = str(tmp_path / f"fresh{k}")  # does not exist yet
        with monkeypatch.context() as m:
            _Faults(m, fail_at=k)
            try:
                new.save(d)
                raised = None
            except ResultSaveError as e:
                raised = e
        if raised is None:
            same(new, Dissection.load(d))
            continue
        failures += 1
        msg = one_line(raised)
        assert f"in {d}: no space left on device" in msg and "nothing was saved" in msg, msg
        assert not os.path.exists(d) or os.listdir(d) == [], (k, op, os.listdir(d))
        with pytest.raises(FileNotFoundError):
            Dissection.load(d)
    assert failures >= 6, failures


def test_failed_save_error_for_other_reasons(tmp_path, monkeypatch):
    d = str(tmp_path / "res")
    make().save(d)
    before = snapshot(d)
    real = os.replace

    def denied(src, dst, *a, **kw):
        if dst.endswith("dissect.json"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(ResultSaveError) as e:
        make(seed=1).save(d)
    monkeypatch.undo()
    msg = one_line(e.value)
    assert f"in {d}: Permission denied while writing dissect.json" in msg and e.value.errno == errno.EACCES
    assert snapshot(d) == before


@pytest.fixture
def tiny_fs(tmp_path):
    """A 200 KiB tmpfs (a real full disk), or a skip saying why there is none."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a small tmpfs to fill up ({e}); the monkeypatched ENOSPC cases cover the steps")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (mount: {r.stderr.strip() or r.returncode}; needs root); "
                    f"the monkeypatched ENOSPC cases cover the steps")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20)


def _free(path):
    s = os.statvfs(path)
    return s.f_bavail * s.f_frsize


def test_real_full_disk_new_arrays_do_not_fit(tiny_fs):
    d = os.path.join(tiny_fs, "res")
    old, new = make(units=8), make(units=2000, concepts=10, seed=1)  # ~200 KB of random arrays
    old.save(d)
    before, free = snapshot(d), _free(tiny_fs)
    with pytest.raises(ResultSaveError) as e:
        new.save(d)
    msg = one_line(e.value)
    assert msg.startswith(f"could not save the dissection in {d}: no space left on device") and "arrays-" in msg
    assert snapshot(d) == before and _free(tiny_fs) == free
    same(old, Dissection.load(d))


def test_real_full_disk_arrays_fit_but_dissect_json_does_not(tiny_fs):
    """The reported case: the new arrays are written, then the JSON write fails."""
    d = os.path.join(tiny_fs, "res")
    old, new = make(units=8), make(units=1500, seed=1, compressible=True)  # tiny npz, ~150 KB of JSON
    old.save(d)
    before = snapshot(d)
    import io as _io
    buf = _io.BytesIO()
    np.savez_compressed(buf, **{f"{l}/{k}": new.array(l, k) for l in new.layers for k in results._ARRAYS})
    page = os.statvfs(tiny_fs).f_frsize
    need = -(-len(buf.getvalue()) // page) * page + 2 * page  # the arrays fit, with a little to spare
    filler = os.path.join(tiny_fs, "filler")
    with open(filler, "wb") as f:
        f.write(b"\0" * (_free(tiny_fs) - need))
    assert len(json_bytes(new.summary())) > 2 * page
    free = _free(tiny_fs)
    with pytest.raises(ResultSaveError) as e:
        new.save(d)
    msg = one_line(e.value)
    assert f"in {d}: no space left on device (ENOSPC) while writing dissect.json" in msg, msg
    assert snapshot(d) == before and _free(tiny_fs) == free  # the new arrays file was removed again
    os.unlink(filler)
    same(old, Dissection.load(d))
    new.save(d)  # with space, the same save succeeds
    same(new, Dissection.load(d))


# -- 3. every cached file is checked against a recorded hash -----------------------------------------

def test_unhashed_download_records_and_checks_its_hash(cache):
    data = os.urandom(5000)
    with _Server({"/f/labels.json": data}) as srv:
        p = cached_file(srv.url + "/f/labels.json", subdir="s", progress=False)
        record = open(p + HASH_SUFFIX).read()
        assert record == f"{hashlib.sha256(data).hexdigest()}  labels.json\n"  # sha256sum format
        assert cached_file(srv.url + "/f/labels.json", subdir="s", progress=False) == p
        assert len(srv.requests) == 1
        open(p, "r+b").write(b"X")  # damaged or replaced in the cache
        with pytest.raises(DownloadError) as e:
            cached_file(srv.url + "/f/labels.json", subdir="s", progress=False)
        msg = one_line(e.value)
        assert msg.startswith(f"{p} in the cache does not match its recorded SHA-256 (expected "
                              f"{hashlib.sha256(data).hexdigest()}, actual {hashlib.sha256(open(p, 'rb').read()).hexdigest()})")
        assert f"Delete it and {p}{HASH_SUFFIX} to download it again from {srv.url}/f/labels.json" in msg
        assert len(srv.requests) == 1  # the wrong file was not used, nor silently replaced
        os.unlink(p)
        os.unlink(p + HASH_SUFFIX)
        assert open(cached_file(srv.url + "/f/labels.json", subdir="s", progress=False), "rb").read() == data


def test_cached_file_without_a_record_is_refused(cache):
    (cache / "s").mkdir(parents=True)
    p = cache / "s" / "encoder_epoch_40.pth"
    p.write_bytes(b"put here by hand, or by an older version")
    url = "http://127.0.0.1:9/encoder_epoch_40.pth"
    with pytest.raises(DownloadError) as e:
        cached_file(url, subdir="s", progress=False)
    msg = one_line(e.value)
    assert f"{p} is in the cache without a recorded SHA-256 ({p}{HASH_SUFFIX} is missing)" in msg
    assert f"Delete it to download it again from {url}" in msg and f"sha256sum {p} > {p}{HASH_SUFFIX}" in msg
    assert sorted(os.listdir(cache / "s")) == ["encoder_epoch_40.pth"]  # nothing written
    os.system(f"sha256sum {p} > {p}{HASH_SUFFIX}")  # the user vouches for it, as the message says
    assert cached_file(url, subdir="s", progress=False) == str(p)
    (cache / "s" / ("encoder_epoch_40.pth" + HASH_SUFFIX)).write_text("garbage\n")
    with pytest.raises(DownloadError, match=r"does not hold a SHA-256 \(64 hex digits\).*Delete both files"):
        cached_file(url, subdir="s", progress=False)


def test_hashed_name_from_an_older_cache_gets_a_record(cache):
    data = b"weights" * 100
    sha = hashlib.sha256(data).hexdigest()
    (cache / "progan").mkdir(parents=True)
    p = cache / "progan" / f"proggan_x-{sha[:8]}.pth"
    p.write_bytes(data)
    assert cached_file(f"http://127.0.0.1:9/{p.name}", sha256=sha[:8], subdir="progan", progress=False) == str(p)
    assert open(str(p) + HASH_SUFFIX).read().split()[0] == sha  # the whole hash is recorded now


def test_download_that_cannot_be_stored_keeps_nothing(cache, monkeypatch):
    data = os.urandom(3000)
    real = os.replace

    def full(src, dst, *a, **kw):
        if dst.endswith(HASH_SUFFIX):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *a, **kw)

    with _Server({"/w.bin": data}) as srv:
        monkeypatch.setattr(os, "replace", full)
        with pytest.raises(DownloadError) as e:
            cached_file(srv.url + "/w.bin", progress=False)
        monkeypatch.undo()
    msg = one_line(e.value)
    assert "could not store it in the cache" in msg and "no space left on device" in msg and "nothing was kept" in msg
    assert os.listdir(cache) == []


def _upp_files(tmp_path):
    from tiny_real import save_upp, tiny_upp_parts
    enc, dec = tiny_upp_parts()
    folder = save_upp(str(tmp_path / "upp_src"), enc, dec)
    return folder, {"/" + f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return {}


def test_upernet_cached_files_are_verified_before_use(cache, tmp_path, monkeypatch):
    from gandissect_widgets.segmenters import upernet
    folder, files = _upp_files(tmp_path)
    with _Server(files) as srv:
        monkeypatch.setattr(upernet, "UPP_URL", srv.url + "/")
        S = upernet.load_upernet(segsizes=None, progress=False)
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        ref = S(x)
        cached = cache / "segmodel" / "upp-resnet50-upernet"
        assert sorted(os.listdir(cached)) == sorted([f[1:] for f in files] + [f[1:] + HASH_SUFFIX for f in files])
        enc = cached / "encoder_epoch_40.pth"
        expected = hashlib.sha256(enc.read_bytes()).hexdigest()
        torch.save({"conv1.weight": _Payload()}, enc)  # a wrong file in the cache, needing trust_pickle
        with pytest.raises(DownloadError) as e:
            upernet.load_upernet(segsizes=None, progress=False)
        msg = one_line(e.value)
        assert f"{enc} in the cache does not match its recorded SHA-256 (expected {expected}, actual " \
               f"{hashlib.sha256(enc.read_bytes()).hexdigest()})" in msg and "Delete it" in msg
        assert "trust_pickle" not in msg and not _Payload.ran
        n = len(srv.requests)
        enc.unlink()
        (cached / ("encoder_epoch_40.pth" + HASH_SUFFIX)).unlink()
        S2 = upernet.load_upernet(segsizes=None, progress=False)  # re-downloaded after deleting, as told
        assert len(srv.requests) == n + 1 and torch.equal(S2(x), ref)
    # the user's own folder needs no hashes
    assert not any(f.endswith(HASH_SUFFIX) for f in os.listdir(folder))
    assert torch.equal(upernet.load_upernet(folder, segsizes=None)(x), ref)


# -- 4. shipped weights: weights only ----------------------------------------------------------------

def test_shipped_loader_reads_weights_only(tmp_path):
    from gandissect_widgets.world import gan, shipped
    G = gan.load_generator()
    good = tmp_path / "generator.pt"
    torch.save(G.state_dict(), good)
    z = G.sample_z(2, 0)
    assert torch.equal(gan.load_generator(checkpoint=str(good))(z), G(z))
    evil = tmp_path / "evil.pt"
    torch.save({"w": _Payload()}, evil)
    with pytest.raises(CheckpointError) as e:
        shipped.load_shipped("generator", lambda c: gan.SceneGenerator(), checkpoint=str(evil))
    assert str(evil) in str(e.value) and not _Payload.ran
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        shipped.load_shipped("generator", lambda c: gan.SceneGenerator(), checkpoint=str(tmp_path / "list.pt"))
