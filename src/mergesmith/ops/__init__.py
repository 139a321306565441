"""Small pure tensor operations composed by the merge methods."""
