"""From a recipe to a run: instantiate components, assemble and check the parts (the one path of run, validate and predict), build the Run."""
