"""POOL tier backends: where encoded pages live when they leave fast memory."""
