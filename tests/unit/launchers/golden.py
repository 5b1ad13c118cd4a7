"""Golden files under tests/golden/: compared exactly; `KIMI_GATEWAY_UPDATE_GOLDEN=1` rewrites them (then
review the diff). The repository root inside them is written `{ROOT}`."""
import os
from pathlib import Path

ROOT = Path(__file__).parents[3]
GOLDEN = ROOT / "tests" / "golden"


def check_golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    actual = actual.replace(str(ROOT), "{ROOT}")
    if os.environ.get("KIMI_GATEWAY_UPDATE_GOLDEN") == "1":
        path.write_text(actual)
    assert path.exists(), f"{path} is missing: run with KIMI_GATEWAY_UPDATE_GOLDEN=1 once and review it"
    assert actual == path.read_text(), f"the output differs from {path}"


def config_from(template: str, tmp_path: Path, **replace: str) -> Path:
    """A golden config template with `{ROOT}` (and any `{KEY}` given) filled in, written under tmp_path."""
    text = (GOLDEN / template).read_text().replace("{ROOT}", str(ROOT))
    for key, value in replace.items():
        text = text.replace("{" + key + "}", value)
    path = tmp_path / Path(template).name
    path.write_text(text)
    return path
