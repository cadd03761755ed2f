"""One run: its pipeline (data -> the scheme's stage specs -> stages -> timing ->
summary), the schemes (who teaches whom), the stage protocol (stage.py: StageSpec and
run_stage: train, reuse or resume through the stage cache), the config checks at
composition (validate.py) and once the data is loaded (data_checks.py), provenance (what a
stage key holds), summary rows, a user's teacher, the int8 add-on."""
