"""edgeroute.export: checkpoint -> edgeroute model folder. torch, transformers and optimum load lazily."""
