"""Where data comes from: the embedded tasks, a user's prompt file and reward function, text
to token ids and back."""
