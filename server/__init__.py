"""InfoMamba Serve: batched engine over a pool of recurrent-state slots, and its HTTP/websocket API."""
