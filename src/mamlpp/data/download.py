"""Fetching the Omniglot archives and CIFAR-100's python archive when they are not on disk.

Each archive is streamed to a temporary file beside its destination, verified, and only then renamed
into place, so an interrupted or wrong download never looks like data. Omniglot: the upstream MD5
when it comes from upstream, and always a valid zip with the expected layout and image counts.
CIFAR-100: always the published MD5 (a mirror must serve the same bytes), and the archive's members.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from . import cifar100
from .common import DataError, _env
from .omniglot import EXPECTED, list_source

UPSTREAM_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
# The upstream archives' MD5s (as published with torchvision's Omniglot). Local re-packed copies
# differ, so these are only checked for downloads from UPSTREAM_URL.
UPSTREAM_MD5 = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
                "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}


def omniglot_base_url(base_url: str | None = None) -> str:
    """The argument, then $MAMLPP_OMNIGLOT_URL, then the public upstream."""
    return (base_url or _env("MAMLPP_OMNIGLOT_URL") or UPSTREAM_URL).rstrip("/")


def _manual_hint(target: Path, names: list[str]) -> str:
    urls = "\n".join(f"  {UPSTREAM_URL}/{n}.zip" for n in names)
    dests = "\n".join(f"  {target / (n + '.zip')}" for n in names)
    return (f"Without internet access, download on another machine:\n{urls}\nand put them at\n{dests}\n"
            "(or point --data-dir / MAMLPP_DATA at a folder whose omniglot/ subfolder holds them).")


def verify_archive(name: str, path: Path, origin: str) -> None:
    """A valid zip with the public archive's layout and alphabet/character/image counts."""
    try:
        classes = list_source(name, path)
    except DataError as e:
        raise DataError(f"{origin}: the downloaded file is not the Omniglot {name} archive: {e}") from e
    found = (len({c.split("/")[0] for c in classes}), len(classes), sum(map(len, classes.values())))
    if found != EXPECTED[name]:
        raise DataError(f"{origin}: holds {found[0]} alphabets, {found[1]} characters, {found[2]} images; "
                        f"the Omniglot {name} archive has {EXPECTED[name][0]}, {EXPECTED[name][1]}, {EXPECTED[name][2]}")


def _writable_target(target: Path, what: str, hint: str) -> None:
    """Create the download folder, or say why the data set cannot be downloaded there."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        if not os.access(target, os.W_OK):
            raise PermissionError(f"{target} is not writable")
    except OSError as e:
        raise DataError(f"{what} is missing and cannot be downloaded into {target} ({e}).\n{hint}") from e


def _fetch(url: str, fd: int, desc: str) -> str:
    """Stream `url` into the open file `fd` (closed, fsynced) with a progress bar; returns its MD5."""
    md5 = hashlib.md5()
    with os.fdopen(fd, "wb") as f:
        with urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=desc, disable=None) as bar:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    md5.update(chunk)
                    bar.update(len(chunk))
        f.flush()
        os.fsync(f.fileno())
    return md5.hexdigest()


def download_omniglot(target: Path, names: list[str], base_url: str | None = None) -> None:
    """Download the named archives (e.g. 'images_background') into the folder `target`."""
    base = omniglot_base_url(base_url)
    _writable_target(target, "Omniglot", _manual_hint(target, names))
    for name in names:
        url = f"{base}/{name}.zip"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.part-", suffix=".zip", dir=target)
        tmp = Path(tmp_name)
        try:
            md5 = _fetch(url, fd, f"{name}.zip")
            if base == UPSTREAM_URL and md5 != UPSTREAM_MD5[name]:
                raise DataError(f"{url}: MD5 {md5} differs from the published {UPSTREAM_MD5[name]}; "
                                "the download is damaged, try again")
            verify_archive(name, tmp, origin=url)
            os.replace(tmp, target / f"{name}.zip")
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise DataError(f"could not download {url} ({e}).\n" + _manual_hint(target, names)) from e
        finally:
            tmp.unlink(missing_ok=True)


def cifar100_url(url: str | None = None) -> str:
    """The argument, then $MAMLPP_CIFAR100_URL (the archive's full URL on a mirror), then the public one."""
    return url or _env("MAMLPP_CIFAR100_URL") or cifar100.URL


def _cifar_hint(target: Path) -> str:
    return (f"Without internet access, download {cifar100.URL} on another machine (MD5 {cifar100.MD5}) and put "
            f"it at {target / cifar100.ARCHIVE} (or point --data-dir / MAMLPP_DATA at a folder whose cifar100/ "
            "subfolder holds it).")


def download_cifar100(target: Path, url: str | None = None) -> None:
    """Download cifar-100-python.tar.gz into the folder `target`, checked against its published MD5."""
    url = cifar100_url(url)
    _writable_target(target, "CIFAR-100", _cifar_hint(target))
    fd, tmp_name = tempfile.mkstemp(prefix=".cifar-100-python.part-", suffix=".tar.gz", dir=target)
    tmp = Path(tmp_name)
    try:
        md5 = _fetch(url, fd, cifar100.ARCHIVE)
        if md5 != cifar100.MD5:
            raise DataError(f"{url}: MD5 {md5} differs from the published {cifar100.MD5}; the download "
                            "is damaged or not the CIFAR-100 python archive, try again")
        try:
            members = cifar100.archive_members(tmp)
        except DataError as e:
            raise DataError(f"{url}: the downloaded file is not the CIFAR-100 python archive: {e}") from e
        missing = [m for m in cifar100.MEMBERS if f"{cifar100.FOLDER}/{m}" not in members]
        if missing:
            raise DataError(f"{url}: the downloaded archive has no {', '.join(missing)} under {cifar100.FOLDER}/")
        os.replace(tmp, target / cifar100.ARCHIVE)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DataError(f"could not download {url} ({e}).\n" + _cifar_hint(target)) from e
    finally:
        tmp.unlink(missing_ok=True)
