"""The converter interface's placeholder: what needs converting, and a precise refusal."""
import pytest

from adapters.conversion import ConversionError, Unconverted
from backends.base import AdapterFiles


async def test_unconverted_names_the_missing_artifact(tmp_path):
    converter = Unconverted()
    files = AdapterFiles("/adapters/legal", None)
    assert converter.needs(files, "gguf") and not converter.needs(files, "source")
    with pytest.raises(ConversionError, match="no `gguf` and no converter is configured"):
        await converter.convert(files, "gguf", tmp_path)
