"""Where templates/, static/ and migrations/ are, from a source checkout or an installed wheel."""

from functools import cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


@cache
def resource_dir(name: str) -> Path:
    """Return the folder `name` (templates, static or migrations).

    A wheel carries them under store/_resources/ (see pyproject.toml); a source checkout or an
    editable install has them at the top of the repository, next to store/.
    """
    for candidate in (_PACKAGE / "_resources" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the {name}/ folder of SAE Atlas; reinstall the package")
