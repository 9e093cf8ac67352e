"""Small model definitions that tests name with --model MODULE:CALLABLE."""
