"""The compiler: trace -> shapes -> match -> rewrite (torch.fx passes), and its report."""
