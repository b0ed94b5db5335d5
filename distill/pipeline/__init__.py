"""The whole pipeline from one config file (`distill run`) and the embedded demo (`distill demo`)."""
