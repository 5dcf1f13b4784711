"""Stage prepare_model: the base model as a Hugging Face folder (safetensors + tokenizer)."""

from nirvana.core.io import log
from nirvana.core.params import Params
from nirvana.core.stage import run_stage
from nirvana.method.surgery import save_model
from nirvana.models import get_adapter
from nirvana.models.loading import load_base


def main(params: Params, out_dir: str) -> None:
    log.info("loading %s", params.model.name_or_path)
    model, tokenizer = load_base(params.model)
    get_adapter(model.config)  # an unsupported architecture fails here, not three stages later
    save_model(model, tokenizer, out_dir)
    log.info("wrote %s (%s, %d layers)", out_dir, model.config.model_type, model.config.num_hidden_layers)


if __name__ == "__main__":
    run_stage("prepare_model", main)
