"""The download cache, against a throwaway HTTP server on 127.0.0.1 (no network)."""
import hashlib
import http.server
import os
import threading

import pytest
import torch

import gandissect_widgets as gw
from gandissect_widgets import download
from gandissect_widgets.download import DownloadError, cached_file, hash_prefix_from_name

from tiny_real import tiny_progan


class _Server:
    """Serves ``files`` {path: bytes}; ``truncate`` {path: n}: the first n requests of it stop halfway."""

    def __init__(self, files, truncate=None):
        self.files, self.truncate, self.requests = files, dict(truncate or {}), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if outer.truncate.get(self.path, 0) > 0:
                    outer.truncate[self.path] -= 1
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _files_in(d):
    return sorted(p for p in (os.listdir(d) if os.path.isdir(d) else []))


def test_cache_dir_env(cache):
    assert download.cache_dir() == str(cache)


def test_hash_prefix_from_name():
    assert hash_prefix_from_name("proggan_bedroom-d8a89ff1.pth") == "d8a89ff1"
    assert hash_prefix_from_name("encoder_epoch_40.pth") is None


def test_good_hash_then_cached(cache):
    data = os.urandom(3 << 20)  # several chunks
    sha = hashlib.sha256(data).hexdigest()
    with _Server({"/m/file.bin": data}) as srv:
        p = cached_file(srv.url + "/m/file.bin", sha256=sha[:8], subdir="x", progress=False)
        assert open(p, "rb").read() == data and p == str(cache / "x" / "file.bin")
        assert cached_file(srv.url + "/m/file.bin", sha256=sha, subdir="x", progress=False) == p
        assert len(srv.requests) == 1  # the second call used the cache
    assert _files_in(cache / "x") == ["file.bin", "file.bin.sha256"]  # the file and its recorded hash


def test_bad_hash_leaves_nothing(cache):
    data = b"not the right weights" * 1000
    with _Server({"/w.pth": data}) as srv:
        with pytest.raises(DownloadError, match="does not start with the expected 00000000"):
            cached_file(srv.url + "/w.pth", sha256="00000000", progress=False)
    assert _files_in(cache) == []


def test_interrupted_download_leaves_nothing_and_retry_succeeds(cache):
    data = os.urandom(1 << 20)
    with _Server({"/big.pth": data}, truncate={"/big.pth": 1}) as srv:
        with pytest.raises(DownloadError) as e:
            cached_file(srv.url + "/big.pth", sha256=hashlib.sha256(data).hexdigest(), progress=False)
        msg = str(e.value)
        assert "big.pth" in msg and srv.url + "/big.pth" in msg and str(cache / "big.pth") in msg
        assert _files_in(cache) == []
        p = cached_file(srv.url + "/big.pth", sha256=hashlib.sha256(data).hexdigest(), progress=False)
        assert open(p, "rb").read() == data
    assert _files_in(cache) == ["big.pth", "big.pth.sha256"]


def test_offline_error_names_file_url_and_place(cache):
    url = "http://127.0.0.1:9/models/proggan_kitchen-67f1e16c.pth"  # nothing listens on port 9
    with pytest.raises(DownloadError) as e:
        cached_file(url, subdir="progan", progress=False)
    msg = str(e.value)
    assert "proggan_kitchen-67f1e16c.pth" in msg and url in msg
    assert str(cache / "progan" / "proggan_kitchen-67f1e16c.pth") in msg and "GANDISSECT_CACHE" in msg


def test_wrong_file_already_in_cache(cache):
    (cache / "progan").mkdir(parents=True)
    (cache / "progan" / "f-12345678.pth").write_bytes(b"junk")
    with pytest.raises(DownloadError, match="not the expected file"):
        cached_file("http://127.0.0.1:9/f-12345678.pth", sha256="12345678", subdir="progan", progress=False)


def test_progan_by_name_downloads_and_verifies_prefix(cache, tmp_path, monkeypatch):
    """A registered ProGAN name fetches its published file name and checks the hash prefix in it."""
    import io

    from gandissect_widgets.models import progan

    G = tiny_progan()
    buf = io.BytesIO()
    torch.save(G.state_dict(), buf)
    data = buf.getvalue()
    fname = f"proggan_tiny-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    monkeypatch.setitem(progan.PROGAN_CHECKPOINTS, "tiny", fname)
    monkeypatch.setitem(progan.PROGAN_CHECKPOINTS, "tampered", "proggan_tampered-0badc0de.pth")
    with _Server({"/models/" + fname: data, "/models/proggan_tampered-0badc0de.pth": data}) as srv:
        monkeypatch.setattr(progan, "PROGAN_URL", srv.url + "/models/")
        G2 = gw.load_generator("progan", name="tiny", progress=False)
        with pytest.raises(DownloadError, match="0badc0de"):
            gw.load_generator("progan", name="tampered", progress=False)
    z = G.sample_z(2, 0)
    assert torch.equal(G(z), G2(z))
    assert _files_in(cache / "progan") == [fname, fname + ".sha256"]
