module ste.dev/images/function

go 1.24.0
