"""`infomamba serve`: pick the model, build the app, run uvicorn."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from server.config import ServerConfig

log = logging.getLogger("infomamba.server")
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "model" / "default_model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device_dtype(config: ServerConfig) -> tuple[str, torch.dtype]:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    else:
        dtype = DTYPES[config.dtype]
    return device, dtype


def random_model(seed: int = 0):
    from model.config import InfoMambaConfig
    from model.infomamba import InfoMamba

    torch.manual_seed(seed)
    return InfoMamba(InfoMambaConfig(d_model=64, n_layers=2, vocab_size=260, name="random-tiny")).eval()


def make_loader(config: ServerConfig, model_dir: str | None):
    """A load() for create_app: the given directory, else the bundled default model, else a seeded random one."""
    from model.tokenizer import load_tokenizer
    from model.weights import load_model

    device, dtype = resolve_device_dtype(config)

    def load():
        directory = Path(model_dir) if model_dir else DEFAULT_MODEL_DIR
        if model_dir or (DEFAULT_MODEL_DIR / "config.json").is_file():
            model = load_model(directory, device=device, dtype=dtype).eval()
            return model, load_tokenizer(directory, model.config.vocab_size)
        log.warning("=" * 78)
        log.warning("NO MODEL GIVEN and no bundled model at %s: serving a RANDOM tiny model (seed 0).", directory)
        log.warning("Its outputs are noise. Pass --model DIR (or INFOMAMBA_MODEL) to serve a real one.")
        log.warning("=" * 78)
        model = random_model().to(device=device, dtype=dtype)
        return model, load_tokenizer(None, model.config.vocab_size)

    return load


def serve(config: ServerConfig, model_dir: str | None, log_level: str = "info") -> None:
    import uvicorn

    from server.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config, make_loader(config, model_dir))
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, ws="websockets-sansio",
                timeout_graceful_shutdown=int(config.shutdown_timeout))
