"""The runtime: a plan's weights applied inside a pipeline's denoiser, step by step (routing), the
`Fusion` that installs and removes it, and the static merge of the weights it does not route."""
