"""Built-in experiments of the paper: data, models and LightningModules."""
