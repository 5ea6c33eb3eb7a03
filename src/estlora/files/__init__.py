"""Files from the outside: where a name leads (paths, folders, hub ids, registered names) and reading
safetensors safely (headers checked first, pickles refused unopened). No model knowledge here."""
