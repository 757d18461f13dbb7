"""What each model function call computes on the worker that holds its replica."""
