terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = ">= 5.40, < 7.0"
    }
    random = {
      source  = "hashicorp/random"
      version = "~> 3.6"
    }
  }

  # State lives in a bucket you create once (see infra/README.md, "Bootstrap"):
  #   terraform -chdir=infra init -backend-config="bucket=<project>-tfstate"
  # Without -backend-config, `init` asks for the bucket name.
  backend "gcs" {
    prefix = "fedcompute"
  }
}

provider "google" {
  project = var.project_id
  region  = var.region
}
