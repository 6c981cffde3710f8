"""Fetching a dataset's files, shown like the rest of the preparation.

torchvision's own download draws a tqdm bar, which in a log file becomes
one line rewritten thousands of times; this one goes through
:mod:`cnnreg.core.progress` (a rich bar with size, rate and time left on a
terminal, a few lines in a log), writes to a ``.part`` file renamed only
once the checksum holds, and leaves an archive already in place alone.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

from cnnreg.core import progress

CHUNK = 1 << 20


def fetch(url: str, target: Path, *, md5: str | None, title: str, timeout: float = 60.0) -> Path:
    """``url`` saved as ``target``, unless a file with that checksum is there already.

    :raises OSError: the download failed, or its checksum is not ``md5``
        (the partial file is removed either way).
    """
    from torchvision.datasets.utils import check_integrity  # torchvision costs a second to import: only here

    target = Path(target)
    if target.is_file() and (md5 is None or check_integrity(str(target), md5)):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    digest = hashlib.md5()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "cnnreg"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress.step(f"downloading {title}", total=total, unit="bytes") as advance:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    advance(len(chunk))
        if md5 is not None and digest.hexdigest() != md5:
            raise OSError(f"the file from {url} has MD5 {digest.hexdigest()}, not {md5}: damaged in transit, or "
                          "the server has another version")
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    progress.note(f"downloaded {title}: {progress.size_text(target.stat().st_size)} to {target}")
    return target
