package main

// Connects to "host=db user=postgres dbname=example" and listens on :8000.
func main() {}
