"""The only modules that touch vLLM internals: plugin registration, platform hooks,
the attention backend (backend, metadata builder, impl), the request tracker."""
