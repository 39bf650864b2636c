"""The API's routers, one module per concern; each handler can be mounted and tested on its own."""
