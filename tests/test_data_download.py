"""Downloading Omniglot, against a local HTTP server that serves the shared copy."""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest

from conftest import make_omniglot
from mamlpp.config import DataConfig
from mamlpp.data import DataError, load_image_set
from mamlpp.data.download import UPSTREAM_URL, download_omniglot, omniglot_base_url

NAMES = ["images_background", "images_evaluation"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(folder) -> base URL of a local HTTP server for that folder, stopped after the test."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_from_local_server(tmp_path, serve, shared_data_root):
    url = serve(shared_data_root / "omniglot")
    target = tmp_path / "data" / "omniglot"
    download_omniglot(target, NAMES, base_url=url)
    for name in NAMES:
        assert (target / f"{name}.zip").read_bytes() == (shared_data_root / "omniglot" / f"{name}.zip").read_bytes()
    assert sorted(p.name for p in target.iterdir()) == ["images_background.zip", "images_evaluation.zip"]


def test_missing_archive_is_downloaded_through_the_env_url(tmp_path, serve, shared_data_root, monkeypatch,
                                                           data_cache_dir, omniglot_set):
    """load_image_set fetches the one missing archive from $MAMLPP_OMNIGLOT_URL, then uses the
    (already built) cache, since the archives are byte-identical."""
    root = tmp_path / "data"
    (root / "omniglot").mkdir(parents=True)
    os.symlink(shared_data_root / "omniglot" / "images_background.zip", root / "omniglot" / "images_background.zip")
    monkeypatch.setenv("MAMLPP_OMNIGLOT_URL", serve(shared_data_root / "omniglot"))
    data = load_image_set(DataConfig(dataset="omniglot"), root, cache_dir=data_cache_dir)
    assert (root / "omniglot" / "images_evaluation.zip").is_file()
    assert data.cache_path == omniglot_set.cache_path


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_no_network_says_what_to_put_where(tmp_path):
    target = tmp_path / "data" / "omniglot"
    with pytest.raises(DataError) as err:
        download_omniglot(target, NAMES, base_url=_closed_port_url())
    msg = str(err.value)
    assert "could not download" in msg and f"{UPSTREAM_URL}/images_background.zip" in msg
    assert str(target / "images_background.zip") in msg and str(target / "images_evaluation.zip") in msg
    assert list(target.iterdir()) == []  # no partial file


def test_wrong_file_served(tmp_path, serve):
    served = tmp_path / "served"
    served.mkdir()
    (served / "images_background.zip").write_bytes(b"<html>rate limited</html>")
    target = tmp_path / "data" / "omniglot"
    with pytest.raises(DataError, match=r"images_background\.zip: the downloaded file is not the Omniglot .*not a valid zip"):
        download_omniglot(target, NAMES[:1], base_url=serve(served))
    assert list(target.iterdir()) == []
    with pytest.raises(DataError, match=r"could not download .*images_evaluation\.zip \(HTTP Error 404"):
        download_omniglot(target, NAMES[1:], base_url=serve(served))


def test_checksum_mismatch_from_upstream_is_refused_and_nothing_cached(tmp_path, serve, shared_data_root,
                                                                      monkeypatch):
    """Downloads from upstream are checked against its published MD5s. The local server stands in for
    upstream and serves the shared images_background.zip: a valid archive with the right contents,
    but re-packed, so its MD5 is not upstream's. Only the checksum can refuse it."""
    from mamlpp.data import download

    served = tmp_path / "served"
    served.mkdir()
    os.symlink(shared_data_root / "omniglot" / "images_background.zip", served / "images_background.zip")
    monkeypatch.setattr(download, "UPSTREAM_URL", serve(served))
    monkeypatch.delenv("MAMLPP_OMNIGLOT_URL", raising=False)
    md5 = hashlib.md5((served / "images_background.zip").read_bytes()).hexdigest()
    assert md5 != download.UPSTREAM_MD5["images_background"]
    root, cache = tmp_path / "data", tmp_path / "cache"
    with pytest.raises(DataError, match=rf"images_background\.zip: MD5 {md5} differs from the published "
                                        rf"{download.UPSTREAM_MD5['images_background']}; the download is damaged"):
        load_image_set(DataConfig(dataset="omniglot"), root, cache_dir=cache)
    assert list((root / "omniglot").iterdir()) == []  # no archive, no partial file
    assert not cache.exists() or not any(cache.rglob("*"))  # nothing cached


def test_archive_with_other_counts_is_rejected(tmp_path, serve):
    served = make_omniglot(tmp_path / "small") / "omniglot"
    target = tmp_path / "data" / "omniglot"
    with pytest.raises(DataError, match=r"holds 2 alphabets, 6 characters, 24 images; the Omniglot images_background archive has 30, 964, 19280"):
        download_omniglot(target, NAMES[:1], base_url=serve(served))


def test_unwritable_target(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data folder should be")
    with pytest.raises(DataError, match=r"(?s)cannot be downloaded into .*put them at"):
        download_omniglot(blocker / "omniglot", NAMES, base_url=_closed_port_url())


def test_base_url_resolution(monkeypatch):
    monkeypatch.delenv("MAMLPP_OMNIGLOT_URL", raising=False)
    assert omniglot_base_url() == UPSTREAM_URL
    monkeypatch.setenv("MAMLPP_OMNIGLOT_URL", "")
    assert omniglot_base_url() == UPSTREAM_URL  # empty counts as unset
    monkeypatch.setenv("MAMLPP_OMNIGLOT_URL", "http://mirror/x/")
    assert omniglot_base_url() == "http://mirror/x"
    assert omniglot_base_url("http://arg") == "http://arg"
