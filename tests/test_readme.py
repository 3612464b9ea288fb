"""The README's API example runs as written (on the embedded model)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.real_model
def test_readme_python_examples_run(smollm2_dir, tmp_path, monkeypatch, capsys):
    """The adapter and optimizer examples (the TRL snippet has placeholders and is covered by test_trainer)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    runnable = [b for b in blocks if "GRPOConfig(...)" not in b]
    assert len(runnable) >= 2, "README lost its runnable examples"
    monkeypatch.chdir(tmp_path)
    for block in runnable:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    leak = float(re.search(r"principal leak ([0-9.e+-]+)", capsys.readouterr().out).group(1))
    assert leak <= 1e-6
    assert (tmp_path / "runs" / "readme-adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "runs" / "readme-as-lora" / "adapter_config.json").exists()
