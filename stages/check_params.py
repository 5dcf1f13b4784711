"""Stage check_params: validate the whole of params.yaml before any other stage runs, so a misspelt,
unknown or missing key fails every `dvc repro` (no other stage depends on a key nobody reads), and
model.name_or_path before prepare_model runs (DVC deletes a stage's outputs first). It writes the keys it
checked, which change only with the code: the stages it orders first never rerun for it; the schema, each
key's type and value in this run; and the environment every stage of this run computes in
(nirvana.core.environment), for the audit."""

from nirvana.core.environment import reproducible
from nirvana.core.io import write_json
from nirvana.core.params import Params, schema
from nirvana.core.stage import run_stage
from nirvana.pipeline.checks import check_model_name


def main(params: Params, keys_out: str, schema_out: str, environment_out: str) -> None:
    check_model_name(params.model.name_or_path)  # run_stage has validated params.yaml (or stopped) before this
    values = schema(params)
    write_json({"checked": list(values)}, keys_out)
    write_json(values, schema_out)
    write_json(reproducible(), environment_out)


if __name__ == "__main__":
    run_stage("check_params", main)
