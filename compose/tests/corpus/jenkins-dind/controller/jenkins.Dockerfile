FROM jenkins/jenkins:2.462.3-jdk17
USER root
RUN apt-get update && apt-get install -y lsb-release
USER jenkins
RUN jenkins-plugin-cli --plugins "blueocean docker-workflow"
