"""Pure functions from raw Firestore values to the items the UI expects. Never raise."""
