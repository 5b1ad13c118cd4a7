"""The gateway's side of adapter conversion: the converter built from the `conversion:` config block, what
`kimi-gateway check` reports about the converter Pythons, and `kimi-gateway setup converters`."""
from __future__ import annotations

import argparse
from pathlib import Path

from adapters import converter_env
from adapters.base_model import BaseModelDims
from adapters.conversion import ConversionSettings, ToolConverter
from gateway.config import GatewayConfig


def converter_of(config: GatewayConfig, base: BaseModelDims | None) -> ToolConverter:
    conversion, hf_config = config.conversion, config.base_model.hf_config
    cache = Path(conversion.cache_dir or Path(config.state_dir) / "converted").expanduser()
    return ToolConverter(ConversionSettings(
        cache_dir=cache.absolute(),
        llama_cpp_python=conversion.llama_cpp_python,
        llama_cpp_dir=conversion.llama_cpp_dir or str(converter_env.scripts_dir()),
        kt_python=conversion.kt_python,
        base_hf_config=hf_config,
        base_name=str(Path(hf_config).parent) if hf_config else "base",
        timeout_s=conversion.timeout_s), base)


def conversion_problems(config: GatewayConfig) -> list[str]:
    """A configured converter Python that lacks what its converter needs (each line says how to fix it)."""
    conversion = config.conversion
    problems = []
    if conversion.llama_cpp_python:
        problems += converter_env.check_llama_cpp(conversion.llama_cpp_python, conversion.llama_cpp_dir)
    if conversion.kt_python:
        problems += converter_env.check_kt(conversion.kt_python)
    return problems


def cmd_setup(args: argparse.Namespace) -> int:
    return converter_env.main(["--dir", str(args.dir)] if args.dir else [])


def add_commands(commands) -> None:
    setup = commands.add_parser("setup", help="make what the gateway runs beside it")
    what = setup.add_subparsers(dest="what", required=True)
    converters = what.add_parser("converters", help="create the two converter venvs (llama.cpp, KT) and "
                                                    "print the `conversion:` config lines")
    converters.add_argument("--dir", type=Path, help=f"where the venvs go (default {converter_env.default_dir()})")
    converters.set_defaults(run=cmd_setup)
