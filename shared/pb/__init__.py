"""Generated gRPC stubs (make proto). Do not edit."""
